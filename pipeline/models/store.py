"""Trained networks on storage: written once with their metadata (``<uri>.json``), loaded by
what uses them (the stages, the report, the segmenter evaluation), imported from elsewhere.

A model file is a plain state dict read with ``weights_only=True``: no code is unpickled.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from pipeline.io import layout, storage
from pipeline.models.backbone import load_state_dict_file
from pipeline.models.cam_net import build_cam_net
from pipeline.models.irnet import build_irnet
from pipeline.models.official import convert_official
from pipeline.models.segmenters import build_segmenter


def write_model(uri: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """``state`` to ``uri`` and ``meta`` to ``<uri>.json`` (the metadata last: a model whose
    metadata exists is complete)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())
    storage.write_text(uri + ".json", json.dumps(meta, indent=2, sort_keys=True, default=str))
    return meta


def import_model(source: str, uri: str, network: str, *, depth: int, num_classes: int | None,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Use the trained ``network`` at ``source`` (an irn-ray model.pt or a checkpoint of the official
    implementation, converted) as this run's model: checked by a strict load at ``depth``, then
    written to ``uri`` like a trained one."""
    state = convert_official(load_state_dict_file(io.BytesIO(storage.read_bytes(source))), network)
    try:
        if network == "cam":
            build_cam_net(num_classes=num_classes, depth=depth, state_dict=state)
        else:
            build_irnet(depth=depth, state_dict=state)
    except RuntimeError as err:
        raise ValueError(f"train_{network}.use_model: {source} does not fit a depth-{depth} {network} network "
                         f"with these classes ({str(err).splitlines()[0]})") from None
    return write_model(uri, state, {**extra, "source": source, "metrics": {}})


def load_exported(uri: str) -> dict[str, torch.Tensor]:
    """A state dict written by :func:`export_model` (weights only: no code is unpickled)."""
    with storage.open_input(uri) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def load_trained(root: str, network: str, *, num_classes: int | None = None) -> torch.nn.Module:
    """The exported ``network`` ('cam' or 'irn') of a run root, built at its trained depth, in eval mode.

    ``num_classes`` is needed for the CAM network. IRNet comes with its stored mean displacement.
    """
    uri = layout.model_file(root, network)
    depth = json.loads(storage.read_text(uri + ".json"))["config"]["depth"]
    if network == "cam":
        return build_cam_net(num_classes=num_classes, depth=depth, state_dict=load_exported(uri)).eval()
    return build_irnet(depth=depth, state_dict=load_exported(uri)).eval()


def load_segmenter(model_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An exported segmenter (eval mode) and its metadata."""
    meta = json.loads(storage.read_text(model_uri + ".json"))
    section = meta["config"]
    net = build_segmenter(meta["network"], len(meta["classes"]), depth=section.get("depth", 50),
                          min_size=section["min_size"], max_size=section["max_size"])
    net.load_state_dict(load_exported(model_uri), strict=True)
    return net.eval(), meta
