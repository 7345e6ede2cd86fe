"""Reading a W&B offline run back: its ``.wandb`` file is a LevelDB-style log of 32 KiB
blocks (a 7-byte ``:W&B`` header, then records of crc32c, length, type), each record one of
wandb's own ``Record`` protobufs. wandb 0.31 ships no Python reader, so this is one."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0 and n == 0:
            break
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def offline_run(wandb_dir: Path) -> Path:
    """The one offline run's ``.wandb`` file, read after the wandb service has exited: a
    finished run's records are written by that separate process, and under CI's load a read
    right after ``finish()`` twice found no history rows in a file that had them later."""
    import wandb

    wandb.teardown()  # waits for the service to close its streams (and their files)
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    return path


def history(path: Path) -> list[dict]:
    """Each logged row as {key: value}, keys joined with '/'."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {
                    "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                    for item in r.history.item
                }
            )
    return rows


def alerts(path: Path) -> list:
    return [r.alert for r in records(path) if r.WhichOneof("record_type") == "alert"]
