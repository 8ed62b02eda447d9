"""The KServe v2 / Open Inference Protocol tensors, JSON and Triton's binary-data extension.

A request is a JSON header (``inputs``, optional ``outputs`` and ``parameters``) optionally followed
by raw tensor bytes (``Inference-Header-Content-Length`` gives the header's length; each binary
input says its ``binary_data_size``). BYTES tensors are 4-byte little-endian lengths each followed
by the element's bytes. ``tritonclient.http`` speaks exactly this. Every malformed request raises
``ProtocolError`` with a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np

HEADER = "Inference-Header-Content-Length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}  # fmt: skip


class ProtocolError(ValueError):
    """A malformed inference request (answered with 400; 413 when ``too_large``)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


#: an input may hold at most this many elements (a 64-image batch of 1024x1024 RGB is ~2e8)
MAX_ELEMENTS = 2**28


def parse_request(
    body: bytes, header_length: str | None, max_batch: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON header, {input name: numpy array or list of bytes for BYTES}).

    ``max_batch``: refuse inputs whose first dimension is larger (before reading any data).
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER} must be an integer (got {header_length!r})") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER} {n} is outside the body of {len(body)} bytes")
        head, rest = body[:n], memoryview(body)[n:]
    else:
        head, rest = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int too long, too deep
        raise ProtocolError(f"request header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ProtocolError("request needs 'inputs': a non-empty list of tensors")
    tensors, offset = {}, 0
    for t in doc["inputs"]:
        name, value, used = _tensor(t, rest, offset, max_batch)
        if name in tensors:
            raise ProtocolError(f"input '{name}' is given twice")
        tensors[name], offset = value, offset + used
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes of binary data are not claimed by any input")
    return doc, tensors


def _tensor(t: Any, rest: memoryview, offset: int, max_batch: int | None) -> tuple[str, Any, int]:
    if not isinstance(t, dict) or not isinstance(t.get("name"), str):
        raise ProtocolError("every input needs a 'name'")
    name, dtype, shape = t["name"], t.get("datatype"), t.get("shape")
    if dtype not in DTYPES and dtype != "BYTES":
        raise ProtocolError(f"input '{name}': datatype {dtype!r} is not one of {', '.join([*DTYPES, 'BYTES'])}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
        raise ProtocolError(f"input '{name}': 'shape' must be a list of at most 8 non-negative integers")
    if max_batch is not None and shape and shape[0] > max_batch:
        raise ProtocolError(f"input '{name}': {shape[0]} images in one request; the limit is {max_batch}", True)
    count = math.prod(shape)  # Python ints: no overflow
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"input '{name}': shape {shape} holds {count} elements, over {MAX_ELEMENTS}", True)
    params = t.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise ProtocolError(f"input '{name}': binary_data_size {size!r} runs past the end of the body")
        raw = rest[offset : offset + size]
        if dtype == "BYTES":
            value = _split_bytes(bytes(raw), count, name)
        else:
            item = np.dtype(DTYPES[dtype]).itemsize
            if size != count * item:
                raise ProtocolError(
                    f"input '{name}': {size} bytes for shape {shape} of {dtype} ({count * item} expected)"
                )
            value = np.frombuffer(raw, DTYPES[dtype]).reshape(shape)
        return name, value, size
    if "data" not in t:
        raise ProtocolError(f"input '{name}': needs 'data' or parameters.binary_data_size")
    if dtype == "BYTES":
        flat = _flatten(t["data"])
        try:
            value = [base64.b64decode(s, validate=True) for s in flat]
        except (TypeError, ValueError, binascii.Error):  # non-ASCII strings raise a plain ValueError
            raise ProtocolError(f"input '{name}': BYTES data in JSON must be base64 strings") from None
        if len(value) != count:
            raise ProtocolError(f"input '{name}': {len(value)} elements for shape {shape}")
        return name, value, 0
    try:
        arr = np.asarray(t["data"], dtype=np.float64 if dtype.startswith("FP") else np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"input '{name}': 'data' must be a (nested) list of numbers") from None
    if arr.size != count:
        raise ProtocolError(f"input '{name}': {arr.size} values for shape {shape} ({count} expected)")
    if dtype == "UINT8" and arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ProtocolError(f"input '{name}': UINT8 values must be within 0..255")
    return name, arr.astype(DTYPES[dtype]).reshape(shape), 0


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        raise ProtocolError("'data' must be a list")
    out: list = []
    for d in data:
        out.extend(_flatten(d) if isinstance(d, list) else [d])
    return out


def _split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if len(out) == count:
            raise ProtocolError(f"input '{name}': more BYTES elements than the {count} in its shape")
        if pos + 4 > len(raw):
            raise ProtocolError(f"input '{name}': truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ProtocolError(f"input '{name}': BYTES element of {n} bytes runs past its data")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise ProtocolError(f"input '{name}': {len(out)} BYTES elements for {count} in its shape")
    return out


def encode_response(
    meta: dict[str, Any], outputs: list[tuple[str, str, np.ndarray | list[bytes], list[int], bool]]
) -> tuple[bytes, int | None]:
    """Response body and the JSON header length (None: the body is all JSON).

    ``outputs``: (name, datatype, value, shape, binary) each; BYTES values are lists of bytes.
    """
    tensors, blobs = [], []
    for name, dtype, value, shape, binary in outputs:
        t: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if binary:
            raw = (b"".join(struct.pack("<I", len(b)) + b for b in value) if dtype == "BYTES"
                   else np.ascontiguousarray(value, dtype=DTYPES[dtype]).tobytes())  # fmt: skip
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif dtype == "BYTES":
            t["data"] = [b.decode("utf-8", "replace") for b in value]
        else:
            t["data"] = np.asarray(value).ravel().tolist()
        tensors.append(t)
    head = json.dumps({**meta, "outputs": tensors}).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
