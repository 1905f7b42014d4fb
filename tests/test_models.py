"""Every method: output names, shapes, finiteness, unit normals and the SPEC A.4 composition."""
import pytest
import torch

from sfs_fast import METHODS, build_model, method_id, output_names
from sfs_fast.kernels import sh_shade
from sfs_fast.models import (DCGANDiscriminator, FixedBilinearUpsample, PatchDiscriminator, SkipNet,
                             bilinear_kernel, build_discriminator)
from sfs_fast.sh import normalize_normal


@pytest.fixture(scope="module")
def outputs():
    """Outputs of every method on one random batch, computed once (reference shading)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128)
    results = {}
    for m in METHODS:
        model = build_model(m, shading_backend="reference").eval()
        with torch.no_grad():
            results[m] = (model, model(x))
    return x, results


@pytest.mark.parametrize("method", sorted(METHODS))
def test_outputs_names_shapes_finite(outputs, method):
    _, results = outputs
    _, out = results[method]
    assert list(out) == output_names(method)
    for name, value in out.items():
        assert torch.isfinite(value).all(), name
        if name == "light":
            assert value.shape == (2, 27)
        else:
            assert value.shape == (2, 3, 128, 128), name
    assert METHODS[method].light == ("light" in out)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_normal_is_unit(outputs, method):
    _, results = outputs
    norm = results[method][1]["normal"].norm(dim=1)
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shading_and_recon_composition(outputs, method):
    """SPEC A.4: shading = SH(normal).light + residue; recon = shading * (albedo - beta*residue)."""
    _, results = outputs
    model, out = results[method]
    if "light" in out:
        sh_only, _ = sh_shade(out["normal"], out["light"], backend="reference")
        assert torch.allclose(out["sh_shading"], sh_only, atol=1e-5)
    if "residue" in out:
        assert torch.allclose(out["shading"], out["sh_shading"] + out["residue"], atol=1e-5)
    elif method == 0:
        assert torch.equal(out["shading"], out["sh_shading"])
    beta = 1.0 if method == 4 else 0.0
    reflectance = out["albedo"] - beta * out["residue"] if beta else out["albedo"]
    assert torch.allclose(out["recon"], out["shading"] * reflectance, atol=1e-6)
    if method == 4:
        assert torch.allclose(out["updated_albedo"], out["albedo"] - out["residue"])
    if method == 1:
        assert torch.equal(out["corrected_shading"], out["shading"])


def test_method4_original_recon_uses_unupdated_albedo(outputs):
    x, results = outputs
    model = results[4][0]
    original = build_model(4, method4_recon="original", shading_backend="reference").eval()
    original.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = original(x)
    assert torch.allclose(out["recon"], out["shading"] * out["albedo"], atol=1e-6)
    assert not torch.allclose(out["recon"], results[4][1]["recon"])


def test_normalize_false_shades_raw_normals():
    torch.manual_seed(1)
    model = build_model(0, normalize=False, shading_backend="reference").eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = model(x)
        raw = model.normal_gen_model(model.normal_residual_model(model.conv_model(x)))
    assert torch.allclose(out["normal"], raw)
    expected, _ = sh_shade(raw, out["light"], normalize=False, backend="reference")
    assert torch.allclose(out["shading"], expected, atol=1e-6)
    assert not torch.allclose(normalize_normal(raw), raw)


def test_upsample_modes_differ_only_in_the_generation_nets():
    bilinear, caffe = build_model(0, upsample="bilinear"), build_model(0, upsample="caffe")
    assert set(caffe.state_dict()) - set(bilinear.state_dict()) == {
        "normal_gen_model.upsample.weight", "albedo_gen_model.upsample.weight"}


def test_fixed_bilinear_upsample_interior_matches_interpolation():
    """Away from the border, Caffe's bilinear deconvolution is plain bilinear x2 upsampling."""
    x = torch.rand(1, 128, 9, 9, dtype=torch.float64)
    up = FixedBilinearUpsample(128).double()(x)
    ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == ref.shape
    assert torch.allclose(up[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-12)
    assert torch.allclose(bilinear_kernel(4)[0], torch.tensor([0.0625, 0.1875, 0.1875, 0.0625]))


def test_method_ids_and_slugs():
    assert method_id(3) == 3 and method_id("3") == 3 and method_id("shading-residue") == 3
    for bad in (8, -1, "nope", None, True, 2.5):
        with pytest.raises(ValueError, match="unknown method"):
            method_id(bad)
    with pytest.raises(ValueError, match="upsample"):
        build_model(0, upsample="nearest")
    with pytest.raises(TypeError):
        build_model(0, not_a_field=1)


def test_trunk_parameter_count():
    """SfSNet trunk (method 0) has 3.42 M parameters (DESIGN section 6)."""
    n = sum(p.numel() for p in build_model(0).parameters())
    assert 3.40e6 < n < 3.45e6


def test_skipnet_and_discriminators_shapes():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128)
    skip = SkipNet(shading_backend="reference").eval()
    with torch.no_grad():
        out = skip(x)
    assert out["normal"].shape == (2, 3, 128, 128) and out["light"].shape == (2, 27)
    assert torch.allclose(out["recon"], out["shading"] * out["albedo"], atol=1e-6)
    assert PatchDiscriminator()(x).shape == (2, 1, 1, 1)
    d = DCGANDiscriminator()(x)
    assert d.shape == (2, 1, 1, 1) and ((d >= 0) & (d <= 1)).all()
    assert isinstance(build_discriminator(5), PatchDiscriminator)
    assert isinstance(build_discriminator("gan-train2"), DCGANDiscriminator)
    with pytest.raises(ValueError):
        build_discriminator(3)


def test_training_gradients_reach_heads():
    torch.manual_seed(0)
    model = build_model(3, shading_backend="reference").train()
    out = model(torch.rand(2, 3, 128, 128))
    out["recon"].mean().backward()
    assert model.shading_residual_model.conv4.weight.grad.abs().sum() > 0
    assert model.light_estimator_model.fc.weight.grad.abs().sum() > 0


def test_calibrate_batchnorm_only_named_modules():
    """``modules=``: those BatchNorms get the batches' statistics; the others keep theirs and
    the model comes back in eval mode."""
    from sfs_fast.models import calibrate_batchnorm

    torch.manual_seed(0)
    model = build_model(1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    out = calibrate_batchnorm(model, [x], modules={"neural_light_model"})
    assert out is model and not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("neural_light_model."):
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k
    bn = model.neural_light_model.conv1[1]  # its input, recomputed: the mean is that of the batch
    with torch.no_grad():
        feats = model.features(x)
        up = torch.nn.functional.interpolate(model.head_input(feats, "NEW"), scale_factor=2.0, mode="bilinear",
                                             align_corners=True)
        pre = model.neural_light_model.conv1[0](up)
    torch.testing.assert_close(bn.running_mean, pre.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# The registry: every method fact comes from its MethodSpec


@pytest.mark.parametrize("method", sorted(METHODS))
def test_spec_is_the_single_source_of_modules_and_outputs(outputs, method):
    """The built model has exactly the spec's modules (checkpoint names, in order) and its
    forward returns exactly the spec's outputs; the trainer's facts name only those."""
    _, results = outputs
    model, out = results[method]
    spec = METHODS[method]
    assert model.spec is spec
    assert [name for name, _ in model.named_children()] == list(spec.module_names)
    assert tuple(out) == spec.outputs
    assert (model.head is None) == (spec.head is None)
    for stage in spec.stages:
        assert {t.output for t in stage.losses} <= set(out)
    assert set(spec.frozen_if_loaded) <= set(spec.module_names)
    assert ("updated_albedo" in out) == bool(spec.beta)


def _spec(**changes):
    """A valid spec of a new method (id 8), with ``changes``."""
    from sfs_fast.models import MethodSpec, Stage, loss_terms

    fields = dict(method=8, slug="test-residue", head="residue", head_module="test_residue_model",
                  head_features="ALL", albedo_features="Fa",
                  stages=(Stage("main", loss_terms(("recon", "face", "l1", 1.0))),))
    fields.update(changes)
    return MethodSpec(**fields)


def test_registered_spec_builds_by_id_and_slug():
    from sfs_fast.models import register_method

    spec = register_method(_spec())
    try:
        assert method_id("test-residue") == 8 and output_names(8) == list(spec.outputs)
        model = build_model("test-residue", shading_backend="reference").eval()
        assert isinstance(model.test_residue_model, type(build_model(3).shading_residual_model))
        assert "test_residue_model.conv4.weight" in model.state_dict()
        with torch.no_grad():
            out = model(torch.rand(1, 3, 32, 32))
        assert list(out) == output_names(8)
        with pytest.raises(ValueError, match="clashes"):
            register_method(_spec(method=9))  # the slug is taken
    finally:
        METHODS.pop(8)
    with pytest.raises(ValueError, match="unknown method"):
        method_id("test-residue")


def test_bad_specs_name_the_field():
    from sfs_fast.models import GanSpec, LossTerm, Stage, loss_terms

    cases = {
        "MethodSpec.head": dict(head="mystery"),
        "MethodSpec.head_module": dict(head_module="conv_model"),
        "MethodSpec.light": dict(light=False),
        "MethodSpec.stages": dict(stages=(Stage("main", loss_terms(("recon", "face", "l1", 1.0))),) * 2),
        "MethodSpec.frozen_if_loaded": dict(frozen_if_loaded=("albedo_residual_model_2",)),
        "MethodSpec.gan": dict(gan=GanSpec("patch", 0.4, "batch")),  # but no adversarial stage
    }
    for field, changes in cases.items():
        with pytest.raises(ValueError, match=field):
            _spec(**changes)
    with pytest.raises(ValueError, match="MethodSpec.stages"):  # a loss on an output it lacks
        _spec(stages=(Stage("main", loss_terms(("latent_light", "face", "l1", 1.0))),))
    with pytest.raises(ValueError, match="GanSpec.discriminator"):
        GanSpec("nope", 0.4, "batch")
    with pytest.raises(ValueError, match="LossTerm.kind"):
        LossTerm("recon", "face", "huber", 1.0)
    with pytest.raises(ValueError, match="LossTerm.target"):
        LossTerm("recon", "image", "l1", 1.0)
