#!/usr/bin/env bash
# Build the agent as one PEX file per CPU architecture, from the committed lock.
#
#   ./build.sh                 dist/kubetail-agent-<version>-linux-{x86_64,aarch64}.pex
#   ./build.sh --arch aarch64  only that architecture (x86_64 or aarch64; repeatable)
#   ./build.sh --check         verify that deploy/lock/agent.lock.json is current (exit 1 if not)
#   ./build.sh --lock          re-resolve the lock from pyproject.toml (newest matching versions)
#   ./build.sh --platforms     re-derive the two Debian 12 platform descriptions (run on a
#                              Debian 12 x86_64 machine: reads Debian's /usr/bin/python3)
#   ./build.sh --runtime PEX DIR
#                              prepare the runtime the image ships (needs no pex, no network):
#                              DIR becomes a venv made from PEX by its tools, byte-compiled,
#                              plus DIR/kubetail-agent, the launcher (see prepare_runtime)
#
# Inputs, all committed under deploy/lock/:
#   build-requirements.txt      the exact pex release (with its hash) that builds everything
#   debian12-cp311-<arch>.json  complete platform of the image's interpreter: Debian 12's
#                               CPython 3.11, glibc 2.36 (so manylinux_2_28 wheels resolve)
#   agent.lock.json             every distribution, pinned by version and sha256, per platform
#
# The PEX runs the module kubetail_agent (entry point kubetail_agent:main) with
# `#!/usr/bin/python3` (the distroless image has no /usr/bin/env) and carries pex's tools, so
# `PEX_TOOLS=1 python3 agent.pex venv DIR` prepares the image's runtime (Dockerfile.distroless).
# The build needs PyPI (wheels are fetched by the URLs and hashes in the lock, then cached in
# PEX_ROOT) and pex on PATH: `pip install --require-hashes -r deploy/lock/build-requirements.txt`.
set -euo pipefail
cd "$(dirname "$0")"

LOCK_DIR=deploy/lock
LOCK=$LOCK_DIR/agent.lock.json
PIP_VERSION=26.2.1           # the pip pex drives to resolve the lock (recorded in the lock)
ALL_ARCHS=(x86_64 aarch64)
PYTHON=${PYTHON:-python3}     # any Python >= 3.11 that runs the pex tool (tomllib)

die() { echo "build.sh: $*" >&2; exit 1; }

need_pex() {
    command -v pex >/dev/null && command -v pex3 >/dev/null ||
        die "pex is not on PATH: pip install --require-hashes -r $LOCK_DIR/build-requirements.txt"
}

platform_file() { echo "$LOCK_DIR/debian12-cp311-$1.json"; }

# The runtime requirements, exactly as pyproject.toml declares them (one per line).
requirements() {
    "$PYTHON" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
}

version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' kubetail_agent.py
}

platform_args() {
    local arch
    for arch in "${ALL_ARCHS[@]}"; do
        printf -- '--complete-platform\n%s\n' "$(platform_file "$arch")"
    done
}

make_platforms() {
    need_pex
    [ "$(uname -m)" = x86_64 ] && grep -q '^VERSION_ID="12"' /etc/os-release ||
        die "--platforms reads Debian 12's own interpreter: run it on Debian 12 x86_64"
    local raw
    raw=$(mktemp)
    pex3 interpreter inspect --python /usr/bin/python3 --markers --tags > "$raw"
    "$PYTHON" - "$raw" "$(platform_file x86_64)" "$(platform_file aarch64)" <<'EOF'
# x86_64: what Debian 12's CPython 3.11 reports about itself. aarch64: the same interpreter
# build on arm64 differs only in the machine, and in the manylinux tags, which packaging
# (PEP 600) lists from glibc 2.36 down to 2.17 there (manylinux1/2010 exist only for x86).
import json, re, sys
src, out_x86, out_arm = sys.argv[1:]
with open(src) as f:
    info = json.load(f)
info.pop("path", None)
env = info["marker_environment"]
env["platform_release"] = ""   # the build machine's kernel: not a property of the target
env["platform_version"] = ""

def aarch64(tag):
    interpreter, abi, platform = tag.split("-")
    if platform == "any":
        return tag
    m = re.fullmatch(r"manylinux_2_(\d+)_x86_64", platform)
    if m:
        return f"{interpreter}-{abi}-manylinux_2_{m[1]}_aarch64" if int(m[1]) >= 17 else None
    new = {"manylinux2014_x86_64": "manylinux2014_aarch64", "linux_x86_64": "linux_aarch64",
           "manylinux2010_x86_64": None, "manylinux1_x86_64": None}[platform]
    return new and f"{interpreter}-{abi}-{new}"

arm = json.loads(json.dumps(info))
arm["marker_environment"]["platform_machine"] = "aarch64"
arm["compatible_tags"] = [t for t in map(aarch64, info["compatible_tags"]) if t]
for path, data in ((out_x86, info), (out_arm, arm)):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(data['compatible_tags'])} tags")
EOF
    rm -f "$raw"
}

make_lock() {
    need_pex
    local -a reqs plats
    mapfile -t reqs < <(requirements)
    mapfile -t plats < <(platform_args)
    pex3 lock create --style strict --pip-version "$PIP_VERSION" --wheel --no-build \
        "${plats[@]}" --indent 1 -o "$LOCK" "${reqs[@]}"
    echo "wrote $LOCK"
}

# The lock is current when it was made from exactly pyproject's dependencies for exactly the
# committed platforms, pins every artifact by sha256, and still resolves every target.
check_lock() {
    need_pex
    [ -f "$LOCK" ] || die "$LOCK is missing: run ./build.sh --lock"
    local reqs
    reqs=$(requirements)
    "$PYTHON" - "$LOCK" "$reqs" "$PIP_VERSION" "$LOCK_DIR/build-requirements.txt" \
        "$(platform_file x86_64)" "$(platform_file aarch64)" <<'EOF'
import json, re, sys
lock_path, reqs, pip_version, build_reqs, *platform_files = sys.argv[1:]
with open(lock_path) as f:
    lock = json.load(f)
problems = []
with open(build_reqs) as f:
    pinned_pex = re.search(r"^pex==(\S+)", f.read(), re.M)[1]
if lock.get("pex_version") != pinned_pex:
    problems.append(f"made by pex {lock.get('pex_version')}, {build_reqs} pins {pinned_pex}")

def normal(req):  # pex rewrites specifier order ("<8,>=7.35.1"): compare the meaning
    m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?([^;]*)(;.*)?", req)
    name, extras, specs, marker = m.groups()
    specs = ",".join(sorted(s.replace(" ", "") for s in specs.split(",") if s.strip()))
    return (re.sub(r"[-_.]+", "-", name).lower(), (extras or "").replace(" ", ""), specs,
            (marker or "").strip())

wanted = sorted(normal(r) for r in reqs.splitlines() if r.strip())
locked = sorted(normal(r) for r in lock["requirements"])
if locked != wanted:
    problems.append(f"requirements differ: lock {lock['requirements']} vs pyproject {reqs.split()}")
if lock.get("pip_version") != pip_version:
    problems.append(f"pip version {lock.get('pip_version')} != {pip_version}")
if lock.get("style") != "strict" or lock.get("allow_builds") or lock.get("allow_prereleases"):
    problems.append("the lock must be strict, wheels only, no pre-releases")
platforms = []
for path in platform_files:
    with open(path) as f:
        platforms.append(json.load(f)["compatible_tags"][0].split("-"))
resolved = [resolve["platform_tag"] for resolve in lock["locked_resolves"]]
if sorted(resolved) != sorted(platforms):
    problems.append(f"the lock resolves for {resolved}, the platform files describe {platforms}")
for resolve in lock["locked_resolves"]:
    for req in resolve["locked_requirements"]:
        for artifact in req["artifacts"]:
            if artifact.get("algorithm") != "sha256" or not artifact.get("hash"):
                problems.append(f"{req['project_name']}: artifact without a sha256")
            if not artifact["url"].endswith(".whl"):
                problems.append(f"{req['project_name']}: not a wheel: {artifact['url']}")
for problem in problems:
    print(f"build.sh --check: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
    # Each platform file must still select a resolve of the lock (no index is asked).
    local arch
    for arch in "${ALL_ARCHS[@]}"; do
        pex3 lock export --complete-platform "$(platform_file "$arch")" --format pip "$LOCK" >/dev/null ||
            die "$LOCK has no resolve for $arch: run ./build.sh --lock"
    done
    echo "build.sh --check: $LOCK is current"
}

build() {
    need_pex
    local ver stage arch out
    local -a reqs
    ver=$(version)
    [ -n "$ver" ] || die "no __version__ in kubetail_agent.py"
    mapfile -t reqs < <(requirements)
    # Only the agent's own sources go in (no build backend runs): the module and the
    # generated protobuf package, under its import name.
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' RETURN
    mkdir -p "$stage/kubetail_agent_proto"
    cp kubetail_agent.py "$stage/"
    cp proto/__init__.py proto/cluster_agent_pb2.py proto/cluster_agent_pb2_grpc.py \
        proto/cluster_agent.proto "$stage/kubetail_agent_proto/"
    mkdir -p dist
    for arch in "${ARCHS[@]}"; do
        out=dist/kubetail-agent-$ver-linux-$arch.pex
        pex --lock "$LOCK" --complete-platform "$(platform_file "$arch")" \
            -D "$stage" -e kubetail_agent:main --python-shebang /usr/bin/python3 \
            --include-tools --no-emit-warnings -o "$out" "${reqs[@]}"
        echo "built $out ($(du -h "$out" | cut -f1))"
    done
}

# The image's runtime. The PEX is unpacked once, at image build, into a venv (pex's own
# `venv` tool, site-packages copied out of PEX_ROOT, nothing linked back into it); every
# module is byte-compiled with unchecked-hash pycs, valid whatever mtimes the image layers
# give the files, so nothing is ever written at run time (readOnlyRootFilesystem). The
# launcher DIR/kubetail-agent runs `#!/usr/bin/python3 -IS`: isolated, no site-packages but
# the venv's, no re-exec, argv[0] kept, so /bin/grpc_health_probe can be a symlink to it
# (the agent enters its probe mode when invoked under that name).
# Run it with the interpreter the image has, at the path the image has it (/usr/bin/python3),
# and with DIR at its final path: the venv and the launcher record both.
prepare_runtime() {
    local pex_file=$1 dir=$2 python=${RUNTIME_PYTHON:-/usr/bin/python3} site pex_root
    [ -f "$pex_file" ] || die "--runtime: no PEX at $pex_file"
    case $dir in /*) ;; *) die "--runtime: DIR must be absolute (the launcher records it)" ;; esac
    [ ! -e "$dir" ] || die "--runtime: $dir exists"
    # A throwaway PEX_ROOT: the venv must not link into it (--site-packages-copies).
    pex_root=$(mktemp -d)
    PEX_TOOLS=1 PEX_ROOT=$pex_root "$python" "$pex_file" venv --site-packages-copies \
        --no-emit-warnings "$dir"
    rm -rf "$pex_root"
    site=$("$dir/bin/python3" -I -c 'import site; print(site.getsitepackages()[0])')
    [ -f "$site/kubetail_agent.py" ] || die "--runtime: kubetail_agent.py is not in $site"
    {
        echo '#!/usr/bin/python3 -IS'
        echo '# kubetail-agent launcher (build.sh --runtime): the agent from the venv beside it.'
        echo 'import site'
        echo 'import sys'
        echo
        echo "site.addsitedir(\"$site\")"
        echo 'from kubetail_agent import main  # noqa: E402'
        echo
        echo 'sys.exit(main())'
    } > "$dir/kubetail-agent"
    chmod 0755 "$dir/kubetail-agent"
    "$python" -IS -m compileall -q -j 0 --invalidation-mode unchecked-hash "$site" >/dev/null
    echo "prepared $dir from $pex_file ($(du -sh "$dir" | cut -f1)); run $dir/kubetail-agent"
}

MODE=build
ARCHS=()
while [ $# -gt 0 ]; do
    case $1 in
        --check) MODE=check ;;
        --lock) MODE=lock ;;
        --platforms) MODE=platforms ;;
        --runtime)
            [ $# -ge 3 ] || die "--runtime needs PEX DIR"
            MODE=runtime RUNTIME_PEX=$2 RUNTIME_DIR=$3
            shift 2 ;;
        --arch)
            [ $# -ge 2 ] || die "--arch needs x86_64 or aarch64"
            case $2 in x86_64 | aarch64) ARCHS+=("$2") ;; *) die "unknown arch $2" ;; esac
            shift ;;
        -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[ ${#ARCHS[@]} -gt 0 ] || ARCHS=("${ALL_ARCHS[@]}")

case $MODE in
    build) build ;;
    check) check_lock ;;
    lock) make_lock ;;
    platforms) make_platforms ;;
    runtime) prepare_runtime "$RUNTIME_PEX" "$RUNTIME_DIR" ;;
esac
