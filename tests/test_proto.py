"""The committed generated code matches proto/cluster_agent.proto, and the wire contract is exact."""

import subprocess
import sys

from conftest import REPO
from kubetail_agent_proto import cluster_agent_pb2 as pb


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _fields(message: type) -> dict[str, tuple[int, str]]:
    return {f.name: (f.number, f.message_type.full_name if f.message_type else f.type) for f in
            message.DESCRIPTOR.fields}


def test_wire_contract() -> None:
    ts = "google.protobuf.Timestamp"
    assert pb.DESCRIPTOR.package == "cluster_agent"
    assert _fields(pb.LogMetadata) == {"id": (1, 9), "spec": (2, "cluster_agent.LogMetadataSpec"),
                                       "fileInfo": (3, "cluster_agent.LogMetadataFileInfo")}
    assert _fields(pb.LogMetadataFileInfo) == {"size": (1, 3), "last_modified_at": (2, ts)}
    assert {n: v[0] for n, v in _fields(pb.LogMetadataSpec).items()} == {
        "node_name": 1, "namespace": 2, "pod_name": 3, "container_name": 4, "container_id": 5}
    assert _fields(pb.LogRecord) == {"timestamp": (1, ts), "message": (2, 9), "is_final": (3, 8)}
    assert {n: v[0] for n, v in _fields(pb.LogRecordsStreamRequest).items()} == {
        "namespace": 1, "pod_name": 2, "container_name": 3, "container_id": 4, "start_time": 5,
        "stop_time": 6, "grep": 7, "follow_from": 8}
    assert dict(pb.FollowFrom.items()) == {"NOOP": 0, "DEFAULT": 1, "END": 2}
    string, enum = 9, 14  # FieldDescriptor types
    assert {v[1] for v in _fields(pb.LogMetadataSpec).values()} == {string}
    assert {n: v[1] for n, v in _fields(pb.LogRecordsStreamRequest).items()} == {
        **dict.fromkeys(["namespace", "pod_name", "container_name", "container_id", "start_time", "stop_time",
                         "grep"], string), "follow_from": enum}
    assert pb.LogRecordsStreamRequest.DESCRIPTOR.fields_by_name["follow_from"].enum_type.full_name == \
        "cluster_agent.FollowFrom"
    assert _fields(pb.LogMetadataList) == {"items": (1, "cluster_agent.LogMetadata")}
    assert _fields(pb.LogMetadataListRequest) == _fields(pb.LogMetadataWatchRequest) == {"namespaces": (1, string)}
    assert _fields(pb.LogMetadataWatchEvent) == {"type": (1, string), "object": (2, "cluster_agent.LogMetadata")}
    repeated = {(m.name, f.name) for m in pb.DESCRIPTOR.message_types_by_name.values()
                for f in m.fields if f.is_repeated}
    assert repeated == {("LogMetadataList", "items"), ("LogMetadataListRequest", "namespaces"),
                        ("LogMetadataWatchRequest", "namespaces")}
    services = {s.name: {m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
                         for m in s.methods} for s in pb.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "LogMetadataService": {"List": ("LogMetadataListRequest", "LogMetadataList", False),
                               "Watch": ("LogMetadataWatchRequest", "LogMetadataWatchEvent", True)},
        "LogRecordsService": {"StreamForward": ("LogRecordsStreamRequest", "LogRecord", True),
                              "StreamBackward": ("LogRecordsStreamRequest", "LogRecord", True)},
    }
