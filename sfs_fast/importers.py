"""Importers of weights made by other code: the official Caffe release and the PyTorch ports.

``import_caffe_h5(path)`` reads ``SfSNet.caffemodel.h5`` (SPEC A.6, B.1.4, B.6.3);
``import_pth(path)`` reads PyTorch state dicts of three layouts (SPEC B.6.1/B.6.2):

* ``sfsnet-pytorch``: the pretrained ``sfs_net_model.SfSNet`` of SfSNet-PyTorch
  (``conv1.conv.0.*``, ``nres1.res.*``, ``nreso.0.*``, ``nout.*``, ``lconv.conv.*``, ``lout.*``);
* ``pipeline``: the Illum / SfSNet-PyTorch ``SfsNetPipeline`` (our attribute names);
* ``mannix``: the Mannix port of the Caffe network (``conv1``, ``bn1``, ``n_res1.bn``, ``nup6``,
  ``Nconv0``, ``fc_light``, ...): BGR input and raw Caffe-space outputs, so it is converted
  exactly like the Caffe weights.

Caffe-space weights are converted so that the model takes RGB in [0, 1] and returns our normal
convention: the BGR input swap is folded into ``conv1``; ``Change_Form`` (BGR->RGB) and the
``2x - 1`` normal mapping are folded into ``Nconv0``; BGR->RGB into ``Aconv0``; the ``lconv1``
input blocks are permuted from Caffe's concat order ``[normal, albedo, conv3]`` to ours
``[conv3, normal, albedo]``; BatchNorm statistics are divided by Caffe's scale factor, with
gamma 1 and beta 0 (the release has no Scale layers).

Every importer returns an eval-mode model with two extra attributes:
``loaded_modules`` (top-level modules whose weights came from the file; the trainer freezes
only these, SPEC A.8) and ``import_metadata`` (provenance written by ``sfs-convert``).
Pickle files are only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from functools import lru_cache
from math import prod
from pathlib import Path

import torch

from sfs_fast.errors import CheckpointError
from sfs_fast.models import build_model, init_weights, method_id

# --------------------------------------------------------------------------------------
# Caffe layer names (SfSNet_deploy.prototxt) and where each goes in our model.

def _caffe_layer_table() -> list[tuple[str, str, str]]:
    """``(caffe layer, kind, our module path)`` for every layer with blobs; ``kind`` is
    ``conv`` (weight, bias), ``bn`` (mean, var, scale factor) or ``deconv`` (weight).

    Albedo layers map to ``albedo_residual_model``; :func:`_albedo_targets` adds the copy into
    ``albedo_residual_model_2`` for the methods that have one.
    """
    table = [("conv1", "conv", "conv_model.conv1.0"), ("bn1", "bn", "conv_model.conv1.1"),
             ("conv2", "conv", "conv_model.conv2.0"), ("bn2", "bn", "conv_model.conv2.1"),
             ("conv3", "conv", "conv_model.conv3")]
    for c, branch in (("n", "normal"), ("a", "albedo")):
        for k in range(1, 6):
            block = f"{branch}_residual_model.block{k}.res"
            table += [(f"{c}bn{k}", "bn", f"{block}.0"), (f"{c}conv{k}", "conv", f"{block}.2"),
                      (f"{c}bn{k}r", "bn", f"{block}.3"), (f"{c}conv{k}r", "conv", f"{block}.5")]
        gen = f"{branch}_gen_model"
        table += [(f"{c}bn6r", "bn", f"{branch}_residual_model.bn1"), (f"{c}up6", "deconv", f"{gen}.upsample"),
                  (f"{c}conv6", "conv", f"{gen}.conv1.0"), (f"{c}bn6", "bn", f"{gen}.conv1.1"),
                  (f"{c}conv7", "conv", f"{gen}.conv2.0"), (f"{c}bn7", "bn", f"{gen}.conv2.1"),
                  (f"{c.upper()}conv0", "conv", f"{gen}.conv3")]
    table += [("lconv1", "conv", "light_estimator_model.conv1.0"), ("lbn1", "bn", "light_estimator_model.conv1.1"),
              ("fc_light", "conv", "light_estimator_model.fc")]
    return table


CAFFE_LAYERS = _caffe_layer_table()


@lru_cache(maxsize=1)
def _sfsnet_shapes() -> dict:
    """Tensor shapes of the SfSNet network (method 0 with the fixed deconvolution): Caffe
    space and ours agree on them, whichever method is being built."""
    model = build_model(0, upsample="caffe")
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _albedo_targets(module_path: str, model) -> list[str]:
    """Our module paths a source module path lands in: the albedo residual branch also fills
    ``albedo_residual_model_2`` (as ``load_model_from_pretrained`` does); modules the method
    lacks (the light estimator of method 2, a missing first albedo branch) are dropped."""
    targets = [module_path]
    if module_path.startswith("albedo_residual_model."):
        targets.append(module_path.replace("albedo_residual_model.", "albedo_residual_model_2.", 1))
    present = dict(model.named_children())
    return [t for t in targets if t.split(".", 1)[0] in present]


def _fresh_model(method, config: dict):
    """The model to load into: heads keep the original ``weights_init`` initialisation."""
    model = build_model(method, **config)
    model.apply(init_weights)
    return model


# --------------------------------------------------------------------------------------
# Caffe-space blobs -> our state dict (shared by the .h5 and the Mannix importers)


def caffe_blobs_to_state(layers: dict, model, source: str) -> tuple[dict, list[str]]:
    """Convert Caffe-space layers to tensors of ``model``'s state dict.

    layers: ``{caffe layer: {"weight", "bias"} | {"mean", "var", ["gamma", "beta"]} | {"weight"}}``
    with BatchNorm statistics already divided by the scale factor. Returns ``(state, loaded)``:
    the tensors to load and the top-level modules they fill. Raises CheckpointError naming a
    missing layer or a wrong shape.
    """
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, kind, module_path in CAFFE_LAYERS:
        blobs = layers.get(name)
        if blobs is None:
            raise CheckpointError(f"{source}: layer {name!r} is missing")
        if kind == "bn":
            ones = torch.ones_like(torch.as_tensor(blobs["mean"]))
            blobs = {"running_mean": blobs["mean"], "running_var": blobs["var"],
                     "weight": blobs.get("gamma", ones), "bias": blobs.get("beta", torch.zeros_like(ones))}
        # Shapes first (the folds below keep them), so that a misfit is named, not a crash.
        tensors = {}
        for field, value in blobs.items():
            tensor = torch.as_tensor(value)
            shape = _sfsnet_shapes()[f"{module_path}.{field}"]
            if tensor.numel() == prod(shape) and tensor.dim() != len(shape) and kind != "deconv":
                tensor = tensor.reshape(shape)  # e.g. InnerProduct blobs stored with 1x1 dims
            if tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(f"{source}: layer {name!r} {field} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(shape)}")
            tensors[field] = tensor
        if name == "conv1":  # Caffe reads BGR: swap the input channels so we can feed RGB.
            tensors["weight"] = tensors["weight"].flip(1)
        elif name == "Nconv0":  # ours = 2 * BGR->RGB(caffe) - 1; the model then normalizes.
            tensors["weight"] = 2.0 * tensors["weight"].flip(0)
            tensors["bias"] = 2.0 * tensors["bias"].flip(0) - 1.0
        elif name == "Aconv0":  # Change_Form: BGR -> RGB albedo.
            tensors = {field: t.flip(0) for field, t in tensors.items()}
        elif name == "lconv1":  # Caffe concat [normal, albedo, conv3] -> ours [conv3, normal, albedo].
            w = tensors["weight"]
            tensors["weight"] = torch.cat([w[:, 256:384], w[:, 0:128], w[:, 128:256]], dim=1)
        for target in _albedo_targets(module_path, model):
            for field, tensor in tensors.items():
                key = f"{target}.{field}"
                if key not in expected:  # a bilinear-interpolation model has no deconvolution kernel
                    continue
                state[key] = tensor.to(expected[key].dtype).clone()
    loaded = sorted({k.split(".", 1)[0] for k in state})
    return state, loaded


def _finish(model, state: dict, loaded: list[str], metadata: dict):
    """Load ``state`` (all other tensors keep their initialisation) and attach provenance."""
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full)
    model.loaded_modules = [name for name, _ in model.named_children() if name in loaded]
    metadata = dict(metadata, loaded_modules=model.loaded_modules)
    model.import_metadata = metadata
    return model.eval()


# --------------------------------------------------------------------------------------
# Caffe .caffemodel.h5


def _read_h5_layers(path: Path) -> dict:
    """``{layer name: [blob arrays in order '0', '1', '2']}`` from a Caffe HDF5 snapshot.

    Caffe writes ``data/<layer>/<i>`` (and sometimes ``diff/...``, gradients); the layer
    groups are found whatever the top-level group is called, preferring ``data``.
    """
    import h5py
    import numpy as np

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        groups: dict[str, dict] = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                keys = list(obj.keys())
                if keys and all(k.isdigit() and isinstance(obj[k], h5py.Dataset) for k in keys):
                    parent = name.rsplit("/", 1)[0] if "/" in name else ""
                    groups.setdefault(parent, {})[name.rsplit("/", 1)[-1]] = obj

        f.visititems(visit)
        if not groups:
            raise CheckpointError(f"{path}: no Caffe layer groups (datasets '0', '1', ...) found")
        parents = [p for p in groups if p.split("/")[-1] != "diff"] or list(groups)
        parent = next((p for p in parents if p.split("/")[-1] == "data"), None)
        if parent is None:  # the group holding the most layers
            parent = max(parents, key=lambda p: len(groups[p]))
        layers = {}
        for layer, group in groups[parent].items():
            n = len(group.keys())
            # float64 so that the scale-factor division and the folds round once, at the end.
            layers[layer] = [np.asarray(group[str(i)][()], dtype=np.float64) for i in range(n)
                             if str(i) in group]
    return layers


def _caffe_bn(blobs, name: str, source) -> dict:
    """Caffe BatchNorm blobs ``(mean*s, var*s, s)`` -> true statistics (s == 0 gives 0, as Caffe)."""
    if len(blobs) != 3:
        raise CheckpointError(f"{source}: BatchNorm layer {name!r} has {len(blobs)} blobs, expected 3")
    scale = torch.as_tensor(blobs[2]).reshape(-1)
    if scale.numel() != 1:
        raise CheckpointError(f"{source}: BatchNorm layer {name!r} scale factor has {scale.numel()} values, expected 1")
    s = float(scale[0])
    factor = 0.0 if s == 0 else 1.0 / s
    return {"mean": torch.as_tensor(blobs[0]).reshape(-1) * factor,
            "var": torch.as_tensor(blobs[1]).reshape(-1) * factor}


def import_caffe_h5(path, method=None, **config):
    """Import the official ``SfSNet.caffemodel.h5`` into ``build_model(method, **config)``.

    ``method`` defaults to 0; other methods get the trunk (both albedo branches from the
    albedo weights) and keep ``init_weights`` heads. ``upsample`` defaults to ``"caffe"``
    (the fixed deconvolution, so that the model equals the Caffe network exactly).
    """
    path = Path(path)
    m = 0 if method is None else method_id(method)
    config = {"upsample": "caffe", **config}
    raw = _read_h5_layers(path)
    layers = {}
    for name, kind, _ in CAFFE_LAYERS:
        blobs = raw.get(name)
        if blobs is None:
            raise CheckpointError(f"{path}: layer {name!r} is missing (is this SfSNet.caffemodel.h5?)")
        if kind == "bn":
            layers[name] = _caffe_bn(blobs, name, path)
        elif kind == "deconv":
            layers[name] = {"weight": torch.from_numpy(blobs[0])}
        else:
            if len(blobs) != 2:
                raise CheckpointError(f"{path}: layer {name!r} has {len(blobs)} blobs, expected weight and bias")
            layers[name] = {"weight": torch.from_numpy(blobs[0]), "bias": torch.from_numpy(blobs[1]).reshape(-1)}
    model = _fresh_model(m, config)
    state, loaded = caffe_blobs_to_state(layers, model, str(path))
    return _finish(model, state, loaded, {"source_format": "caffe-h5", "source_layout": "SfSNet_deploy.prototxt",
                                          "folded": "bgr-input, bgr-outputs, normal-2x-1, lconv1-concat-order, "
                                                    "bn-scale-factor"})


# --------------------------------------------------------------------------------------
# PyTorch .pth / .pkl


def _torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything that
    would run code (a pickled object) is refused before it runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not loadable safely"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused: not a plain PyTorch state dict readable with "
                              f"weights_only=True ({first[:200]})") from None
    # Unwrap the usual checkpoint containers.
    for _ in range(2):
        if isinstance(obj, dict):
            for key in ("state_dict", "model_state_dict", "model", "net"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: does not hold a state dict (found {type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor; not a state dict")
        if key.endswith("num_batches_tracked"):
            continue
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def _detect_layout(state: dict) -> str | None:
    keys = set(state)
    if any(k.startswith("conv_model.") for k in keys):
        return "pipeline"
    if "conv1.conv.0.weight" in keys or any(k.startswith("nres1.res.") for k in keys):
        return "sfsnet-pytorch"
    if "Nconv0.weight" in keys or any(k.startswith("n_res1.") for k in keys):
        return "mannix"
    return None


def _sfsnet_pytorch_prefixes() -> list[tuple[str, str]]:
    """``(source module, our module)`` for ``sfs_net_model.SfSNet`` (SPEC B.6.2)."""
    pairs = [("conv1.conv", "conv_model.conv1"), ("conv2.conv", "conv_model.conv2"), ("conv3", "conv_model.conv3"),
             ("lconv.conv", "light_estimator_model.conv1"), ("lout", "light_estimator_model.fc")]
    for c, branch in (("n", "normal"), ("a", "albedo")):
        pairs += [(f"{c}res{k}", f"{branch}_residual_model.block{k}") for k in range(1, 6)]
        pairs += [(f"{c}reso.0", f"{branch}_residual_model.bn1"), (f"{c}conv1.conv", f"{branch}_gen_model.conv1"),
                  (f"{c}conv2.conv", f"{branch}_gen_model.conv2"), (f"{c}out", f"{branch}_gen_model.conv3")]
    return pairs


def _map_by_prefix(state: dict, pairs, model, source) -> tuple[dict, list[str]]:
    expected = model.state_dict()
    out = {}
    for src_prefix, dst_prefix in pairs:
        for dst in _albedo_targets(dst_prefix, model):
            for key in expected:
                if not key.startswith(dst + ".") or key.endswith("num_batches_tracked"):
                    continue
                src_key = src_prefix + key[len(dst):]
                if src_key not in state:
                    raise CheckpointError(f"{source}: {src_key} is missing (needed for {key})")
                tensor = state[src_key]
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise CheckpointError(f"{source}: {src_key} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(expected[key].shape)} for {key}")
                out[key] = tensor.to(expected[key].dtype).clone()
    # Source tensors of modules the target method lacks (method 2 has no light estimator) are
    # not an error; tensors that belong to no known module are.
    known = tuple(p + "." for p, _ in pairs)
    stray = sorted(k for k in state if not k.startswith(known))
    if stray:
        raise CheckpointError(f"{source}: unexpected tensors for this layout: {', '.join(stray[:4])}")
    return out, sorted({k.split(".", 1)[0] for k in out})


def _mannix_to_caffe(state: dict, source) -> dict:
    """The Mannix port's module names -> Caffe layers (BN already divided by the scale factor)."""
    names = {}
    for c in ("n", "a"):
        for k in range(1, 6):
            names.update({f"{c}bn{k}": f"{c}_res{k}.bn", f"{c}conv{k}": f"{c}_res{k}.conv",
                          f"{c}bn{k}r": f"{c}_res{k}.bnr", f"{c}conv{k}r": f"{c}_res{k}.convr"})

    layers, used = {}, set()
    for name, kind, _ in CAFFE_LAYERS:
        module = names.get(name, name)
        fields = {"conv": ("weight", "bias"), "deconv": ("weight",),
                  "bn": ("running_mean", "running_var")}[kind]
        blobs = {}
        for field in fields:
            key = f"{module}.{field}"
            if key not in state:
                raise CheckpointError(f"{source}: {key} is missing (Mannix SfSNet layout)")
            blobs[field] = state[key]
            used.add(key)
        if kind == "bn":
            blobs = {"mean": blobs["running_mean"], "var": blobs["running_var"]}
            for field, ours in (("weight", "gamma"), ("bias", "beta")):
                if f"{module}.{field}" in state:
                    blobs[ours] = state[f"{module}.{field}"]
                    used.add(f"{module}.{field}")
        layers[name] = blobs
    stray = sorted(set(state) - used)
    if stray:
        raise CheckpointError(f"{source}: unexpected tensors for the Mannix layout: {', '.join(stray[:4])}")
    return layers


def _infer_pipeline_method(state: dict) -> int:
    heads = {k.split(".", 1)[0] for k in state}
    if "shading_correctness_model" in heads:
        return 1
    if "shading_model" in heads:
        return 2
    if "residual_model" in heads:
        return 4
    if "shading_residual_model" in heads:
        # 3, 6 and 7 share one architecture (3 is the default); 5 has no second albedo branch.
        return 3 if "albedo_residual_model_2" in heads else 5
    return 0


def import_pth(path, method=None, **config):
    """Import a PyTorch state dict (``.pth``/``.pkl``/``.pt``) of one of the layouts of the
    module docstring into ``build_model(method, **config)``.

    SfSNet-only layouts (``sfsnet-pytorch``, ``mannix``, a method-0 ``pipeline``) build any
    method: the trunk is loaded and heads keep ``init_weights``. A ``pipeline`` state dict with
    a method head loads only as that method's architecture (``method`` defaults to the one its
    keys show). Raises CheckpointError on a refused pickle, an unknown layout or a misfit.
    """
    path = Path(path)
    state = _torch_load(path)
    layout = _detect_layout(state)
    if layout is None:
        raise CheckpointError(f"{path}: unknown state-dict layout (keys such as "
                              f"{', '.join(sorted(state)[:3])}); expected SfSNet-PyTorch, an SfsNetPipeline "
                              f"or the Mannix port")
    meta = {"source_format": "pytorch-state-dict", "source_layout": layout}
    if layout == "mannix":
        layers = _mannix_to_caffe(state, path)
        m = 0 if method is None else method_id(method)
        model = _fresh_model(m, {"upsample": "caffe", **config})
        out, loaded = caffe_blobs_to_state(layers, model, str(path))
        meta["folded"] = "bgr-input, bgr-outputs, normal-2x-1, lconv1-concat-order"
        return _finish(model, out, loaded, meta)
    if layout == "sfsnet-pytorch":
        m = 0 if method is None else method_id(method)
        model = _fresh_model(m, config)
        out, loaded = _map_by_prefix(state, _sfsnet_pytorch_prefixes(), model, path)
        return _finish(model, out, loaded, meta)

    # pipeline: our attribute names.
    stored = _infer_pipeline_method(state)
    m = stored if method is None else method_id(method)
    if stored != 0 and m != stored and not _same_architecture(stored, m):
        raise CheckpointError(f"{path}: holds an SfsNetPipeline of method {stored}, not method {m}")
    has_caffe_upsample = any(k.endswith("gen_model.upsample.weight") for k in state)
    model = _fresh_model(m, {"upsample": "caffe" if has_caffe_upsample else "bilinear", **config})
    expected = model.state_dict()
    if stored == 0 and m != 0:
        # SfSNet trunk into another method, as load_model_from_pretrained does.
        pairs = [(name, name) for name in ("conv_model", "normal_residual_model", "normal_gen_model",
                                           "albedo_residual_model", "albedo_gen_model", "light_estimator_model")]
        out, loaded = _map_by_prefix(state, pairs, model, path)
        meta["source_method"] = 0
        return _finish(model, out, loaded, meta)
    missing = sorted(k for k in expected if k not in state
                     and not k.endswith(("upsample.weight", "num_batches_tracked")))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit method {m} (missing {', '.join(missing[:3]) or 'none'}; "
                              f"unexpected {', '.join(unexpected[:3]) or 'none'})")
    out = {}
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        out[key] = tensor.to(expected[key].dtype).clone()
    meta["source_method"] = stored
    return _finish(model, out, sorted({k.split(".", 1)[0] for k in out}), meta)


def _same_architecture(a: int, b: int) -> bool:
    """Methods 3, 6 and 7 share one architecture (they differ in training only)."""
    return {a, b} <= {3, 6, 7}
