"""Write tests/core/fixtures/adm_tiny_reference.safetensors from openai/guided-diffusion's own code.

The fixture holds a tiny random ADM's state dict, an input, timesteps, the
UNet's output and guided-diffusion's ``p_mean_variance`` (learned-range
variance, x̂₀ clipped) for that input, all computed by guided-diffusion's
``UNetModel``/``GaussianDiffusion``. The pack's re-implementation must
reproduce them (tests/core/test_adm.py). Nothing of guided-diffusion is copied:
its package is imported from a checkout given on the command line.

    git clone https://github.com/openai/guided-diffusion /tmp/guided-diffusion
    python scripts/make_adm_fixture.py /tmp/guided-diffusion
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "core" / "fixtures" / "adm_tiny_reference.safetensors"
# legacy attention with 2 heads, scale-shift norm, residual up/down-sampling, learned variance, 2 levels
CONFIG = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1", learn_sigma=True,
              class_cond=False, use_checkpoint=False, attention_resolutions="8", num_heads=1, num_head_channels=16,
              num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
              use_new_attention_order=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("guided_diffusion", type=Path, help="a checkout of github.com/openai/guided-diffusion")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    sys.path.insert(0, str(args.guided_diffusion))
    from guided_diffusion.script_util import create_gaussian_diffusion, create_model

    torch.manual_seed(0)
    model = create_model(**CONFIG).eval()
    with torch.no_grad():  # random weights everywhere (the release zero-initialises some output convs)
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # group norms
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
            p.copy_(p.half().float())  # stored as float16; both sides compute in float32 from the same values
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                          timestep_respacing="")
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 740])
    with torch.no_grad():
        out = model(x, t)
        pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=True)
    tensors = {f"model.{k}": v.half().contiguous() for k, v in model.state_dict().items()}
    tensors.update(x=x, t=t, out=out, p_mean=pmv["mean"].float(), p_log_variance=pmv["log_variance"].float(),
                   pred_xstart=pmv["pred_xstart"].float())
    commit = subprocess.run(["git", "-C", str(args.guided_diffusion), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata={"guided_diffusion_commit": commit, "config": json.dumps(CONFIG),
                                                "torch": torch.__version__})
    print(f"{args.out}: {args.out.stat().st_size} bytes, guided-diffusion {commit}")


if __name__ == "__main__":
    main()
