"""Every architecture in spandrel's MAIN_REGISTRY at a small configuration, random weights.

    from spandrel_zoo import ARCHITECTURES, EXCLUDED, make
    model = make("HAT")              # nn.Module in eval mode, torch.manual_seed(0) weights
    spec = ARCHITECTURES["HAT"]      # spec.size (H = W of the input), spec.scale, spec.purpose

    python benchmarks/spandrel_zoo.py [ID ...]   # self-check: a table of id, parameters,
                                                 # input size, forward seconds, detected id

Each builder picks hyperparameters that spandrel's own loader reads back from the state
dict, so ``spandrel.ModelLoader().load_from_state_dict(make(id).state_dict())`` gives the
same ``architecture.id`` (the self-check tests it through a saved ``.pth``, as a user's
downloaded checkpoint would be loaded). ``size`` is the smallest side >= 32 that satisfies
the loaded descriptor's ``size_requirements`` (minimum, multiple_of, square); the self-check
tests that too. Every one of the registry's architectures is either in ``ARCHITECTURES`` or
in ``EXCLUDED`` with the reason.

Only torch and spandrel are imported (spandrel inside the builders), so the module is
importable from benchmarks and tests without layerdiff.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

__all__ = ["Spec", "ARCHITECTURES", "EXCLUDED", "make", "registry_ids", "smallest_size"]


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build one architecture small."""

    id: str                      # spandrel's architecture id
    build: Callable[[], nn.Module]
    size: int                    # H = W of the input to use
    scale: int                   # output size / input size
    purpose: str                 # "SR", "Restoration", "Face", "Inpainting"
    in_channels: int = 3
    note: str = ""


def _arch(module: str):
    import importlib

    return importlib.import_module(f"spandrel.architectures.{module}")


# --- builders ------------------------------------------------------------------------------
# One function per architecture; each returns the bare module (make() seeds and sets eval).

def _compact():
    return _arch("Compact").Compact(num_feat=16, num_conv=4, upscale=2)


def _swiftsrgan():
    return _arch("SwiftSRGAN").SwiftSRGAN(num_channels=16, num_blocks=2, upscale_factor=2)


def _hat():
    return _arch("HAT").HAT(embed_dim=24, depths=(1,), num_heads=(2,), window_size=4,
                            compress_ratio=3, squeeze_factor=8, mlp_ratio=2.0,
                            upsampler="pixelshuffle", upscale=2, num_feat=16)


def _grl():
    return _arch("GRL").GRL(embed_dim=16, depths=[1], num_heads_window=[1],
                            num_heads_stripe=[1], mlp_ratio=2.0,
                            upsampler="pixelshuffledirect", upscale=2)


def _swin2sr():
    return _arch("Swin2SR").Swin2SR(embed_dim=16, depths=[1], num_heads=[2], window_size=4,
                                    mlp_ratio=2.0, upsampler="pixelshuffledirect", upscale=2)


def _swinir():
    return _arch("SwinIR").SwinIR(embed_dim=16, depths=[1], num_heads=[2], window_size=8,
                                  mlp_ratio=2.0, upsampler="pixelshuffledirect", upscale=2)


def _restoreformer():
    return _arch("RestoreFormer").RestoreFormer(n_embed=64, embed_dim=16, ch=32,
                                                ch_mult=(1, 2), num_res_blocks=1,
                                                z_channels=16, attn_resolutions=(16,))


def _omnisr():
    return _arch("OmniSR").OmniSR(num_feat=16, block_num=1, window_size=8, up_scale=2)


def _scunet():
    return _arch("SCUNet").SCUNet(dim=64, config=[1, 1, 1, 1, 1, 1, 1])


def _fbcnn():
    return _arch("FBCNN").FBCNN(nc=[16, 32, 64, 512], nb=2)


def _uformer():
    return _arch("Uformer").Uformer(embed_dim=4, depths=[1] * 9, win_size=8, mlp_ratio=2.0)


def _rgt():
    return _arch("RGT").RGT(embed_dim=24, depth=[2], num_heads=[2], mlp_ratio=2.0,
                            split_size=[4, 4], upscale=2)


def _dat():
    return _arch("DAT").DAT(embed_dim=24, depth=[2], num_heads=[2], expansion_factor=2.0,
                            split_size=[2, 4], upscale=2, upsampler="pixelshuffledirect")


def _craft():
    return _arch("CRAFT").CRAFT(embed_dim=24, depths=[2], num_heads=[2], upscale=2)


def _kbnet():
    return _arch("KBNet").KBNet_s(width=16, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 1],
                                  dec_blk_nums=[1, 1, 1, 1])


def _ditn():
    return _arch("DITN").DITN(dim=16, ITL_blocks=1, SAL_blocks=1, UFONE_blocks=1, upscale=2)


def _mmrealsr():
    return _arch("MMRealSR").MMRealSR(num_in_ch=3, num_out_ch=3, scale=4, num_feat=16,
                                      num_block=1, num_grow_ch=8,
                                      num_feats=[16, 16, 32, 32], num_blocks=[1, 1, 1, 1])


def _span():
    return _arch("SPAN").SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2)


def _realcugan():
    return _arch("RealCUGAN").UpCunet2x(in_channels=3, out_channels=3)


def _safmn():
    return _arch("SAFMN").SAFMN(dim=16, n_blocks=2, ffn_scale=2.0, upscaling_factor=2)


def _safmnbcie():
    return _arch("SAFMNBCIE").SAFMNBCIE(dim=16, n_blocks=2, num_layers=1, ffn_scale=2.0,
                                        upscaling_factor=2)


def _dctlsa():
    return _arch("DCTLSA").DCTLSA(nf=20, num_modules=6, upscale=2)


def _fftformer():
    return _arch("FFTformer").FFTformer(dim=8, num_blocks=[1, 1, 1], num_refinement_blocks=1)


def _nafnet():
    return _arch("NAFNet").NAFNet(width=16, middle_blk_num=1, enc_blk_nums=[1, 1],
                                  dec_blk_nums=[1, 1])


def _atd():
    return _arch("ATD").ATD(embed_dim=24, depths=(2,), num_heads=(2,), window_size=4,
                            category_size=32, num_tokens=16, reducted_dim=4,
                            upsampler="pixelshuffledirect", upscale=2)


def _mixdehazenet():
    return _arch("MixDehazeNet").MixDehazeNet(embed_dims=[8, 16, 32, 16, 8],
                                              depths=[1, 1, 1, 1, 1])


def _drunet():
    return _arch("DRUNet").DRUNet(in_nc=4, out_nc=3, nc=[16, 32, 64, 128], nb=2)


def _dncnn():
    return _arch("DnCNN").DnCNN(in_nc=3, out_nc=3, nc=16, nb=5, act_mode="BR")


def _ipt():
    return _arch("IPT").IPT(patch_size=24, n_feats=16, num_layers=1, scale=[2])


def _drct():
    return _arch("DRCT").DRCT(embed_dim=24, depths=(1,), num_heads=(2,), window_size=8, gc=8,
                              upsampler="pixelshuffle", upscale=2)


def _esrgan():
    return _arch("ESRGAN").ESRGAN(num_filters=16, num_blocks=1, scale=2)


def _plksr():
    return _arch("PLKSR").PLKSR(dim=16, n_blocks=2, upscaling_factor=2)


def _retinexformer():
    return _arch("RetinexFormer").RetinexFormer(n_feat=8, stage=1, num_blocks=[1, 1, 1])


def _hvicidnet():
    return _arch("HVICIDNet").HVICIDNet(channels=[8, 8, 16, 32])


def _seemore():
    return _arch("SeemoRe").SeemoRe(scale=2, embedding_dim=16, num_layers=1, num_experts=2)


def _mosr():
    return _arch("MoSR").MoSR(n_block=2, dim=16, upscale=2)


def _moesr():
    return _arch("MoESR").MoESR(dim=16, n_blocks=1, n_block=1, upsample_dim=16, scale=2)


def _rcan():
    return _arch("RCAN").RCAN(n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4, scale=2)


def _fdat():
    return _arch("FDAT").FDAT(embed_dim=24, num_groups=1, depth_per_group=2, num_heads=2,
                              window_size=8, mid_dim=16, upsampler_type="pixelshuffledirect",
                              scale=2)


def _aurasr():
    return _arch("AuraSR").AuraSR(
        dim=8, image_size=None, input_image_size=None,
        style_network={"dim_in": 16, "dim_out": 64, "depth": 1},
        self_attn_dim_head=8, attn_depths=(1, 1, 1, 1, 1), mid_attn_depth=1,
        num_conv_kernels=2)


# (id, builder, size, scale, purpose as spandrel's descriptor says). Not under 1M parameters:
# FBCNN 30M (its quality-factor head hardcodes Linear(512, 512), so nc[3] = 512, and the
# loader needs nb >= 2), SCUNet 5.5M (head dim 32 on half of dim needs dim 64), AuraSR 4.9M,
# KBNet 2.1M, RealCUGAN 1.3M (fixed widths), DRUNet 1.1M.
_TABLE = [
    ("Compact", _compact, 32, 2, "SR"),
    ("SwiftSRGAN", _swiftsrgan, 32, 2, "SR"),
    ("HAT", _hat, 32, 2, "SR"),
    ("GRL", _grl, 32, 2, "SR"),
    ("Swin2SR", _swin2sr, 32, 2, "SR"),
    ("SwinIR", _swinir, 32, 2, "SR"),
    ("RestoreFormer", _restoreformer, 32, 1, "FaceSR"),
    ("OmniSR", _omnisr, 32, 2, "SR"),
    ("SCUNet", _scunet, 40, 1, "Restoration"),
    ("FBCNN", _fbcnn, 32, 1, "Restoration"),
    ("Uformer", _uformer, 128, 1, "Restoration"),
    ("RGT", _rgt, 32, 2, "SR"),
    ("DAT", _dat, 32, 2, "SR"),
    ("CRAFT", _craft, 32, 2, "SR"),
    ("KBNet", _kbnet, 32, 1, "Restoration"),
    ("DITN", _ditn, 32, 2, "SR"),
    ("MMRealSR", _mmrealsr, 32, 4, "SR"),
    ("SPAN", _span, 32, 2, "SR"),
    ("RealCUGAN", _realcugan, 32, 2, "SR"),
    ("SAFMN", _safmn, 32, 2, "SR"),
    ("SAFMNBCIE", _safmnbcie, 32, 1, "Restoration"),
    ("DCTLSA", _dctlsa, 32, 2, "SR"),
    ("FFTformer", _fftformer, 32, 1, "Restoration"),
    ("NAFNet", _nafnet, 32, 1, "Restoration"),
    ("ATD", _atd, 32, 2, "SR"),
    ("MixDehazeNet", _mixdehazenet, 40, 1, "Restoration"),
    ("DRUNet", _drunet, 32, 1, "Restoration"),
    ("DnCNN", _dncnn, 32, 1, "Restoration"),
    ("IPT", _ipt, 32, 2, "SR"),
    ("DRCT", _drct, 32, 2, "SR"),
    ("ESRGAN", _esrgan, 32, 2, "SR"),
    ("PLKSR", _plksr, 32, 2, "SR"),
    ("RetinexFormer", _retinexformer, 32, 1, "Restoration"),
    ("HVICIDNet", _hvicidnet, 32, 1, "Restoration"),
    ("SeemoRe", _seemore, 32, 2, "SR"),
    ("MoSR", _mosr, 32, 2, "SR"),
    ("MoESR", _moesr, 32, 2, "SR"),
    ("RCAN", _rcan, 32, 2, "SR"),
    ("FDAT", _fdat, 32, 2, "SR"),
    ("AuraSR", _aurasr, 32, 4, "SR"),
]

ARCHITECTURES: dict[str, Spec] = {
    row[0]: Spec(id=row[0], build=row[1], size=row[2], scale=row[3], purpose=row[4])
    for row in _TABLE
}

EXCLUDED: dict[str, str] = {
    "GFPGAN": "spandrel's loader always builds the full GFPGANv1Clean (86M parameters) and "
              "its input is fixed at 512x512; no smaller configuration is detected",
    "LaMa": "spandrel's loader always builds the full big-lama generator (51M parameters); "
            "an inpainting model with two inputs (image, mask) that the one-input "
            "converters (chaiNNer, neosr, traiNNer-redux) do not take",
}


def make(arch_id: str, seed: int = 0) -> nn.Module:
    """Build ``arch_id`` small with ``torch.manual_seed(seed)`` weights, in eval mode."""
    spec = ARCHITECTURES[arch_id]
    torch.manual_seed(seed)
    model = spec.build()
    return model.eval()


def registry_ids() -> list[str]:
    """Every architecture id in spandrel's MAIN_REGISTRY."""
    from spandrel import MAIN_REGISTRY

    return [s.architecture.id for s in MAIN_REGISTRY.architectures()]


def smallest_size(req, at_least: int = 32) -> int:
    """The smallest side >= ``at_least`` satisfying spandrel ``SizeRequirements``."""
    side = max(at_least, req.minimum or 0)
    m = req.multiple_of or 1
    return -(-side // m) * m


def _check(arch_id: str, folder) -> dict:
    import time
    from pathlib import Path

    import spandrel

    row: dict = {"id": arch_id}
    model = make(arch_id)
    spec = ARCHITECTURES[arch_id]
    row["params"] = sum(p.numel() for p in model.parameters())
    path = Path(folder) / f"{arch_id}.pth"
    torch.save(model.state_dict(), path)
    desc = spandrel.ModelLoader().load_from_file(path)
    row["detected"] = desc.architecture.id
    req = desc.size_requirements
    row["size"] = spec.size
    row["size_ok"] = spec.size == smallest_size(req)
    row["req"] = f"min={req.minimum} mult={req.multiple_of}{' square' if req.square else ''}"
    ok = True
    for a, b in zip(model.state_dict().values(), desc.model.state_dict().values()):
        ok = ok and a.shape == b.shape and torch.equal(a, b)
    row["same_weights"] = ok
    x = torch.rand(1, desc.input_channels, spec.size, spec.size)
    t = time.perf_counter()
    with torch.no_grad():
        y = desc(x)
    row["forward_s"] = time.perf_counter() - t
    row["scale_ok"] = desc.scale == spec.scale and tuple(y.shape[-2:]) == (
        spec.size * spec.scale, spec.size * spec.scale)
    row["purpose"] = desc.purpose
    return row


def main(argv=None) -> int:
    import argparse
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ids", nargs="*", help="architecture ids (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ids = args.ids or list(ARCHITECTURES)
    missing = set(registry_ids()) - set(ARCHITECTURES) - set(EXCLUDED)
    bad = 0
    print("| id | params | size | scale | forward s | detected | size ok | purpose |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for arch_id in ids:
            try:
                r = _check(arch_id, folder)
            except Exception as e:  # noqa: BLE001 - a self-check row per architecture
                bad += 1
                print(f"| {arch_id} | FAIL {type(e).__name__}: {str(e)[:150]} |", flush=True)
                continue
            good = (r["detected"] == arch_id and r["size_ok"] and r["same_weights"]
                    and r["scale_ok"])
            bad += not good
            print(f"| {arch_id} | {r['params'] / 1e6:.3f}M | {r['size']} | "
                  f"{ARCHITECTURES[arch_id].scale}{'' if r['scale_ok'] else ' (WRONG)'} | "
                  f"{r['forward_s']:.2f} | {r['detected']}"
                  f"{'' if r['same_weights'] else ' (weights differ)'} | "
                  f"{'yes' if r['size_ok'] else 'NO ' + r['req']} | {r['purpose']} |",
                  flush=True)
    for arch_id, reason in EXCLUDED.items():
        print(f"excluded {arch_id}: {reason}")
    if missing:
        print(f"NOT COVERED: {sorted(missing)}")
    print(f"{len(ids) - bad}/{len(ids)} ok")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
