"""Shared checks of the fused shading op: an independent float64 NumPy reference, random
cases, and forward/backward comparisons (used by test_kernels.py and test_kernels_triton.py)."""
import math

import numpy as np
import torch

from sfs_fast.kernels import sh_shade, sh_shade_reference

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ independent reference
def sh_constants():
    att = (math.pi, 2 * math.pi / 3, math.pi / 4)
    return (att[0] / math.sqrt(4 * math.pi), att[1] * math.sqrt(3 / (4 * math.pi)),
            att[2] * 0.5 * math.sqrt(5 / (4 * math.pi)), att[2] * 3 * math.sqrt(5 / (12 * math.pi)),
            att[2] * 3 * math.sqrt(5 / (48 * math.pi)))


def numpy_shade(normal, light, residue, albedo, normalize, beta):
    """float64 NumPy: [B,3,H,W] arrays, light [B,27] -> (shading, recon or None)."""
    c1, c2, c3, c4, c5 = sh_constants()
    n = normal.astype(np.float64)
    if normalize:
        n = n / (np.sqrt((n ** 2).sum(1, keepdims=True)) + 1e-8)
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    basis = np.stack([np.full_like(x, c1), c2 * z, c2 * x, c2 * y, c3 * (2 * z * z - x * x - y * y),
                      c4 * x * z, c4 * y * z, c5 * (x * x - y * y), c4 * x * y], 1)  # [B,9,H,W]
    coeffs = light.astype(np.float64).reshape(-1, 3, 9)
    shading = np.einsum("bck,bkhw->bchw", coeffs, basis)
    if residue is not None:
        shading = shading + residue
    recon = None
    if albedo is not None:
        recon = shading * (albedo - (beta * residue if residue is not None else 0.0))
    return shading, recon


def rel_err(got, want):
    got = got.detach().double().cpu().numpy() if isinstance(got, torch.Tensor) else got
    want = want.detach().double().cpu().numpy() if isinstance(want, torch.Tensor) else want
    scale = max(np.abs(want).max(initial=0.0), 1e-12)
    return float(np.abs(got - want).max(initial=0.0) / scale)


# ------------------------------------------------------------------ random cases
def make_case(seed, dtype, device="cpu"):
    """A random problem: shapes incl. odd H/W and B=0, optional residue/albedo, strides."""
    rng = np.random.default_rng(seed)
    b = int(rng.choice([0, 1, 2, 3]))
    h, w = int(rng.integers(1, 12)), int(rng.integers(1, 40))
    case = dict(normalize=bool(rng.integers(0, 2)), beta=float(rng.choice([0.0, 1.0])),
                noncontig=bool(rng.integers(0, 2)))

    def tensor(shape, low=-1.0, high=1.0):
        t = torch.from_numpy(rng.uniform(low, high, shape)).to(dtype)
        if case["noncontig"] and len(shape) == 4:  # a channels-last view: same values, other strides
            t = t.contiguous(memory_format=torch.channels_last)
        elif case["noncontig"]:
            t = t.t().contiguous().t()
        return t.to(device)

    normal = tensor((b, 3, h, w))
    if b and h * w > 2:  # zero-length normals
        normal[:, :, 0, 0] = 0
    case.update(normal=normal, light=tensor((b, 27)),
                residue=tensor((b, 3, h, w), -0.3, 0.3) if rng.integers(0, 2) else None,
                albedo=tensor((b, 3, h, w), 0.0, 1.0) if rng.integers(0, 2) else None)
    return case


def as_numpy(t):
    """float64 NumPy copy of a tensor (None stays None)."""
    return None if t is None else t.double().cpu().numpy()


def check_forward(backend, dtype, seed, device="cpu"):
    """One random case through sh_shade(backend) vs numpy_shade."""
    case = make_case(seed, dtype, device)
    args = (case["normal"], case["light"], case["residue"], case["albedo"])
    shading, recon = sh_shade(*args, normalize=case["normalize"], beta=case["beta"], backend=backend)
    want_s, want_r = numpy_shade(*map(as_numpy, args), case["normalize"], case["beta"])
    assert shading.dtype == dtype and shading.shape == case["normal"].shape and shading.is_contiguous()
    assert rel_err(shading, want_s) <= TOL[dtype]
    if case["albedo"] is None:
        assert recon is None
    else:
        assert recon.dtype == dtype and rel_err(recon, want_r) <= TOL[dtype]


def check_backward(backend, dtype, seed, device="cpu"):
    """Gradients of one random case through sh_shade(backend) vs autograd of the float64 reference."""
    case = make_case(seed, dtype, device)
    names = ("normal", "light", "residue", "albedo")
    if case["normal"].shape[0] == 0:
        return  # empty batch: covered by the forward and the empty-batch test
    # Zero-length normals: the reference's gradient there is NaN (sqrt at 0); the fused
    # kernels use the limit. Compare away from them and check finiteness separately.
    case["normal"] = case["normal"].clone()
    case["normal"][:, :, 0, 0] = 0.5
    ins = {k: case[k] for k in names}
    want_in = {k: (None if v is None else v.detach().double().requires_grad_()) for k, v in ins.items()}
    got_in = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in ins.items()}
    kw = dict(normalize=case["normalize"], beta=case["beta"])
    ws, wr = sh_shade_reference(*want_in.values(), **kw)
    gs, gr = sh_shade(*got_in.values(), backend=backend, **kw)
    g_s = torch.randn(ws.shape, dtype=torch.float64, device=ws.device)
    g_r = torch.randn(ws.shape, dtype=torch.float64, device=ws.device)
    (ws * g_s).sum().backward() if wr is None else (ws * g_s + wr * g_r).sum().backward()
    if gr is None:
        torch.autograd.backward([gs], [g_s.to(dtype)])
    else:
        torch.autograd.backward([gs, gr], [g_s.to(dtype), g_r.to(dtype)])
    for k in names:
        if ins[k] is None:
            continue
        got = got_in[k].grad
        assert got is not None and got.dtype == dtype and got.shape == ins[k].shape, k
        assert rel_err(got, want_in[k].grad) <= TOL[dtype], k


