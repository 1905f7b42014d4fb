"""The weight importers: Caffe .caffemodel.h5 against an independent forward of the Caffe
graph, the three .pth layouts against the model they were made from, and refusals."""
import copy
import pickle

import h5py
import numpy as np
import pytest
import torch

import caffe_reference as cr
from sfs_fast import build_model
from sfs_fast.importers import import_caffe_h5, import_pth
from sfs_fast.weights import CheckpointError, load_any

TRUNK = ["conv_model", "normal_residual_model", "albedo_residual_model", "normal_gen_model",
         "albedo_gen_model", "light_estimator_model"]


@pytest.fixture(scope="module")
def layers():
    return cr.deploy_layers()


@pytest.fixture(scope="module")
def caffe_blobs(layers):
    # BatchNorm statistics from a small calibration image keep the activations well scaled.
    calib = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return cr.random_blobs(layers, seed=3, calibrate_input=calib)


@pytest.fixture(scope="module")
def caffe_h5(tmp_path_factory, layers, caffe_blobs):
    return cr.write_caffe_h5(tmp_path_factory.mktemp("caffe") / "SfSNet.caffemodel.h5", caffe_blobs, layers)


@pytest.fixture(scope="module")
def imported(caffe_h5):
    """The method-0 import of the fixture (shared: importing takes seconds on a busy machine)."""
    return import_caffe_h5(caffe_h5, shading_backend="reference")


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------------------
# Caffe


def test_fixture_matches_the_prototxt(layers, caffe_blobs):
    """The fixture has the released network's layers: 30 convolutions, 29 BN (TEST copies), 2 deconvs."""
    kinds = {}
    for layer in layers:
        kinds[cr._one(layer, "type")] = kinds.get(cr._one(layer, "type"), 0) + 1
    assert kinds["BatchNorm"] == 29 and kinds["Deconvolution"] == 2 and kinds["Convolution"] == 30
    assert kinds["Concat"] == 2 and kinds["Eltwise"] == 10 and kinds["InnerProduct"] == 1
    assert caffe_blobs["lconv1"][0].shape == (128, 384, 1, 1)
    assert caffe_blobs["nup6"][0].shape == (128, 1, 4, 4)
    scale = [float(b[2][0]) for b in caffe_blobs.values() if len(b) == 3]
    assert len(scale) == 29 and min(scale) > 1.5  # scale factors != 1 are exercised


def test_caffe_import_equals_caffe_forward(layers, caffe_blobs, imported):
    """The converted model (RGB in, upsample=caffe) equals the Caffe graph run on BGR input
    followed by the release's post-processing, to 1e-5 (both in float64)."""
    model = copy.deepcopy(imported)
    assert model.config.upsample == "caffe" and model.method == 0
    rgb = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = cr.postprocess(cr.CaffeNet(layers, caffe_blobs).forward(rgb.flip(1)))
    ours = _outputs(model.double(), rgb)
    for key in ("normal", "albedo", "light"):
        diff = (ours[key] - ref[key]).abs().max().item()
        assert diff <= 1e-5, f"{key}: max abs diff {diff:.3g}"
    # Not a vacuous comparison: outputs vary over the image and the light is far from zero.
    assert ref["normal"].std(dim=(2, 3)).min() > 1e-3 and ref["light"].abs().max() > 0.1
    assert model.import_metadata["source_format"] == "caffe-h5"
    assert sorted(model.loaded_modules) == sorted(TRUNK)


def test_caffe_import_converts_blobs(imported, caffe_blobs):
    """Blob-level facts: BN stats divided by s with gamma 1 / beta 0, lconv1 blocks permuted,
    the deconvolution loaded, and the BGR / 2x-1 folds."""
    sd = imported.state_dict()
    m, v, s = caffe_blobs["nbn3r"]
    bn = "normal_residual_model.block3.res.3"
    torch.testing.assert_close(sd[f"{bn}.running_mean"], torch.from_numpy(m / s[0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(sd[f"{bn}.running_var"], torch.from_numpy(v / s[0]), rtol=1e-6, atol=0)
    assert torch.equal(sd[f"{bn}.weight"], torch.ones(128)) and torch.equal(sd[f"{bn}.bias"], torch.zeros(128))
    w = torch.from_numpy(caffe_blobs["lconv1"][0])
    ours = sd["light_estimator_model.conv1.0.weight"]
    assert torch.equal(ours[:, :128], w[:, 256:]) and torch.equal(ours[:, 128:256], w[:, :128])
    assert torch.equal(sd["albedo_gen_model.upsample.weight"], torch.from_numpy(caffe_blobs["aup6"][0]))
    assert torch.equal(sd["conv_model.conv1.0.weight"], torch.from_numpy(caffe_blobs["conv1"][0]).flip(1))
    nb = torch.from_numpy(caffe_blobs["Nconv0"][1])
    assert torch.allclose(sd["normal_gen_model.conv3.bias"], 2 * nb.flip(0) - 1)


def test_caffe_scale_factor_zero_gives_zero_stats(tmp_path, layers, caffe_blobs):
    """Caffe's guard: a scale factor of 0 means statistics 0, not a division by zero."""
    blobs = dict(caffe_blobs)
    blobs["lbn1"] = [caffe_blobs["lbn1"][0], caffe_blobs["lbn1"][1], np.zeros(1, np.float32)]
    model = import_caffe_h5(cr.write_caffe_h5(tmp_path / "zero.h5", blobs, layers))
    sd = model.state_dict()
    assert torch.equal(sd["light_estimator_model.conv1.1.running_mean"], torch.zeros(128))
    assert torch.equal(sd["light_estimator_model.conv1.1.running_var"], torch.zeros(128))


def test_caffe_layer_groups_found_under_any_top_group(tmp_path, layers, caffe_blobs, imported):
    other = cr.write_caffe_h5(tmp_path / "other.h5", caffe_blobs, layers, top="weights")
    a, b = imported.state_dict(), import_caffe_h5(other).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_caffe_into_other_method_loads_trunk_only(caffe_h5, imported):
    """Method 3 from SfSNet weights: the trunk (both albedo branches from the albedo weights),
    the head left at init_weights init (zero conv bias) and not listed as loaded."""
    m0 = imported.state_dict()
    m3 = import_caffe_h5(caffe_h5, method=3)
    sd = m3.state_dict()
    assert m3.method == 3
    assert sorted(m3.loaded_modules) == sorted(TRUNK + ["albedo_residual_model_2"])
    for key, value in m0.items():
        assert torch.equal(sd[key], value), key
        if key.startswith("albedo_residual_model."):
            assert torch.equal(sd[key.replace("albedo_residual_model.", "albedo_residual_model_2.", 1)], value)
    assert torch.count_nonzero(sd["shading_residual_model.conv1.0.bias"]) == 0
    m2 = import_caffe_h5(caffe_h5, method=2)  # no light estimator: its blobs are skipped
    assert "light_estimator_model" not in m2.loaded_modules


def test_caffe_missing_layer_and_wrong_shape_are_named(tmp_path, layers, caffe_blobs):
    blobs = {k: v for k, v in caffe_blobs.items() if k != "nconv3r"}
    with pytest.raises(CheckpointError, match="nconv3r"):
        import_caffe_h5(cr.write_caffe_h5(tmp_path / "missing.h5", blobs, layers))
    blobs = dict(caffe_blobs, fc_light=[np.zeros((26, 128), np.float32), np.zeros(26, np.float32)])
    with pytest.raises(CheckpointError, match="fc_light"):
        import_caffe_h5(cr.write_caffe_h5(tmp_path / "shape.h5", blobs, layers))
    blobs = dict(caffe_blobs, conv1=[np.zeros(5, np.float32), np.zeros(64, np.float32)])  # before any fold
    with pytest.raises(CheckpointError, match="'conv1' weight has shape"):
        import_caffe_h5(cr.write_caffe_h5(tmp_path / "dims.h5", blobs, layers))
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("data")
    with pytest.raises(CheckpointError, match="no Caffe layer"):
        load_any(tmp_path / "empty.h5")


# --------------------------------------------------------------------------------------
# .pth layouts


def _random_model(method, seed, **config):
    """A model with random weights and random BatchNorm statistics and affine parameters
    (as a trained PyTorch port has), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(method, shading_backend="reference", **config)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model0():
    return _random_model(0, 11)


@pytest.fixture(scope="module")
def image():
    # The models are fully convolutional up to a global mean, so a small image checks the
    # mapping as well as a 128x128 one, at a sixteenth of the cost.
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _sfsnet_pytorch_state(model) -> dict:
    """Our state dict renamed to ``sfs_net_model.SfSNet`` keys (SPEC B.6.1), written out by hand."""
    rename = {"conv_model.conv1.": "conv1.conv.", "conv_model.conv2.": "conv2.conv.", "conv_model.conv3.": "conv3.",
              "light_estimator_model.conv1.": "lconv.conv.", "light_estimator_model.fc.": "lout."}
    for c, branch in (("n", "normal"), ("a", "albedo")):
        for k in range(1, 6):
            rename[f"{branch}_residual_model.block{k}.res."] = f"{c}res{k}.res."
        rename[f"{branch}_residual_model.bn1."] = f"{c}reso.0."
        rename[f"{branch}_gen_model.conv1."] = f"{c}conv1.conv."
        rename[f"{branch}_gen_model.conv2."] = f"{c}conv2.conv."
        rename[f"{branch}_gen_model.conv3."] = f"{c}out."
    out = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in rename if key.startswith(p))
        out[rename[prefix] + key[len(prefix):]] = value.clone()
    assert "nres3.res.5.weight" in out and "areso.0.running_var" in out and "lout.bias" in out
    return out


def test_pth_sfsnet_pytorch_layout(tmp_path, model0, image):
    path = tmp_path / "net_epoch_r5_5.pth"
    torch.save(_sfsnet_pytorch_state(model0), path)
    imported = import_pth(path, shading_backend="reference")
    assert imported.import_metadata["source_layout"] == "sfsnet-pytorch"
    ref, ours = _outputs(model0, image), _outputs(imported, image)
    for key in ref:
        assert torch.equal(ref[key], ours[key]), key
    # Into method 7: both albedo branches from the albedo weights, head not loaded.
    m7 = import_pth(path, method=7)
    sd, src = m7.state_dict(), model0.state_dict()
    assert torch.equal(sd["albedo_residual_model_2.block2.res.2.weight"], src["albedo_residual_model.block2.res.2.weight"])
    assert "shading_residual_model" not in m7.loaded_modules and "albedo_residual_model_2" in m7.loaded_modules


def test_pth_pipeline_layout(tmp_path, image):
    model = _random_model(3, 12)
    path = tmp_path / "pipeline.pth"
    state = model.state_dict()
    torch.save({"module." + k: v for k, v in state.items()}, path)  # as saved from DataParallel
    imported = import_pth(path, shading_backend="reference")
    assert imported.method == 3 and imported.import_metadata["source_layout"] == "pipeline"
    ref, ours = _outputs(model, image), _outputs(imported, image)
    for key in ref:
        assert torch.equal(ref[key], ours[key]), key
    assert "shading_residual_model" in imported.loaded_modules
    with pytest.raises(CheckpointError, match="method"):
        import_pth(path, method=1)
    with pytest.raises(CheckpointError, match="method"):
        import_pth(path, method=0)


def _mannix_state(model) -> dict:
    """Our (RGB, normalized-normal) model expressed in the Mannix port's Caffe-space layout:
    BGR input, raw normal image ``(n + 1) / 2`` in BGR, BGR albedo, Caffe concat order."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}

    def put(dst, src, bn=False):
        fields = ("weight", "bias", "running_mean", "running_var") if bn else ("weight", "bias")
        for f in fields:
            out[f"{dst}.{f}"] = sd[f"{src}.{f}"]
        if bn:
            out[f"{dst}.num_batches_tracked"] = torch.tensor(3)

    put("conv1", "conv_model.conv1.0")
    out["conv1.weight"] = out["conv1.weight"].flip(1)
    put("bn1", "conv_model.conv1.1", bn=True)
    put("conv2", "conv_model.conv2.0")
    put("bn2", "conv_model.conv2.1", bn=True)
    put("conv3", "conv_model.conv3")
    for c, branch in (("n", "normal"), ("a", "albedo")):
        for k in range(1, 6):
            res = f"{branch}_residual_model.block{k}.res"
            put(f"{c}_res{k}.bn", f"{res}.0", bn=True)
            put(f"{c}_res{k}.conv", f"{res}.2")
            put(f"{c}_res{k}.bnr", f"{res}.3", bn=True)
            put(f"{c}_res{k}.convr", f"{res}.5")
        put(f"{c}bn6r", f"{branch}_residual_model.bn1", bn=True)
        out[f"{c}up6.weight"] = sd[f"{branch}_gen_model.upsample.weight"]
        put(f"{c}conv6", f"{branch}_gen_model.conv1.0")
        put(f"{c}bn6", f"{branch}_gen_model.conv1.1", bn=True)
        put(f"{c}conv7", f"{branch}_gen_model.conv2.0")
        put(f"{c}bn7", f"{branch}_gen_model.conv2.1", bn=True)
        put(f"{c.upper()}conv0", f"{branch}_gen_model.conv3")
    out["Nconv0.weight"] = out["Nconv0.weight"].flip(0) / 2
    out["Nconv0.bias"] = (out["Nconv0.bias"].flip(0) + 1) / 2
    out["Aconv0.weight"], out["Aconv0.bias"] = out["Aconv0.weight"].flip(0), out["Aconv0.bias"].flip(0)
    put("lconv1", "light_estimator_model.conv1.0")
    w = out["lconv1.weight"]
    out["lconv1.weight"] = torch.cat([w[:, 128:256], w[:, 256:384], w[:, :128]], dim=1)
    put("lbn1", "light_estimator_model.conv1.1", bn=True)
    put("fc_light", "light_estimator_model.fc")
    return out


def test_pth_mannix_layout(tmp_path, image):
    """The Mannix layout is Caffe space: importing undoes BGR, 2x-1 and the concat order, and
    loads the deconvolution kernels (made non-bilinear here so that loading them shows)."""
    source = _random_model(0, 13, upsample="caffe")
    for gen in (source.normal_gen_model, source.albedo_gen_model):
        gen.upsample.weight.add_(0.05 * torch.randn_like(gen.upsample.weight))
    source.eval()
    path = tmp_path / "mannix.pth"
    torch.save(_mannix_state(source), path)
    imported = import_pth(path, shading_backend="reference")
    assert imported.config.upsample == "caffe" and imported.import_metadata["source_layout"] == "mannix"
    ref, ours = _outputs(source, image), _outputs(imported, image)
    for key in ("normal", "albedo", "light", "shading", "recon"):
        diff = (ref[key] - ours[key]).abs().max().item()
        assert diff <= 1e-5 * max(1.0, ref[key].abs().max().item()), f"{key}: {diff:.3g}"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_pickle_payload_is_refused_and_not_run(tmp_path):
    armed, guarded = tmp_path / "armed", tmp_path / "guarded"

    class Payload:
        def __init__(self, marker):
            self.marker = str(marker)

        def __reduce__(self):
            return (open, (self.marker, "w"))

    # The payload is live: an unsafe load would create the marker ...
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(armed)}, tmp_path / "armed.pth")
    torch.load(tmp_path / "armed.pth", weights_only=False)["x"].close()
    assert armed.exists()
    # ... the importer refuses it and nothing runs.
    path = tmp_path / "evil.pth"
    torch.save({"conv_model.conv1.0.weight": torch.zeros(1), "x": Payload(guarded)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        import_pth(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_any(path)
    assert not guarded.exists()
    raw = tmp_path / "evil.pkl"  # a bare pickle (not a torch zip) as well
    raw.write_bytes(pickle.dumps({"x": Payload(guarded)}))
    with pytest.raises(CheckpointError):
        load_any(raw)
    assert not guarded.exists()


def test_pth_unknown_layout_and_wrong_shape(tmp_path, model0):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="unknown state-dict layout"):
        import_pth(path)
    state = _sfsnet_pytorch_state(model0)
    state["nout.weight"] = torch.zeros(4, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="nout.weight"):
        import_pth(path)
    state = _sfsnet_pytorch_state(model0)
    del state["ares2.res.2.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="ares2.res.2.bias"):
        import_pth(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="state dict"):
        import_pth(path)
