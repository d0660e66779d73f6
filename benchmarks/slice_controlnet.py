"""How close a pruned UNet + a `dp slice`d ControlNet stays to the original pair (tiny SD fixture).

Usage:
    python benchmarks/slice_controlnet.py [--ratios 0.25,0.5] [--seeds 3]

The tiny text-conditional pipeline of tests/test_ldm.py (random weights, CLIP-like text encoder, KL
autoencoder) with a ControlNet made from its UNet (``ControlNetModel.from_unet``; its zero-initialised
output convolutions given random weights, so it does something). For each layout and ratio the UNet is
pruned (magnitude), the ControlNet sliced with ``dp slice``, and both pairs sample from the same noise,
prompts and conditioning image (DDIM, 10 steps, guidance 1):

- ``ssim_latents``: SSIM of the final latents (pruned pair vs original pair), both mapped to [0, 1] with the
  original's range: the tiny random autoencoder decodes to near-constant images, so image SSIM says nothing;
- ``ssim_latents_no_controlnet``: the same for the UNets alone (what pruning alone changes);
- ``controlnet_effect_cosine``: cosine between the ControlNet's effect on one UNet forward
  (``unet(x, residuals) - unet(x)``) in the pruned pair (on the kept channels) and in the original pair.

Writes benchmarks/results/slice_controlnet.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from _common import RESULTS, machine_info
    from helpers.latent import write_text_pipeline

    import dpcli
    from dpcli.metrics import ssim_psnr
    from dpcli.slicing import load_controlnet
    from dpcli.testing import invoke

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="dp-slice-controlnet-"))
    folder = write_text_pipeline(work / "sd", work / "tokenizer")
    original = dpcli.load(folder)
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(
        original.module, conditioning_embedding_out_channels=(16, 32)
    ).eval()
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.05)
    controlnet.save_pretrained(work / "controlnet")
    prompts = ["a red square", "a blue circle"]
    condition = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))

    def latents(model, net, seed):
        pipe = model.pipeline()
        if net is not None:
            parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
            pipe = StableDiffusionControlNetPipeline(
                **parts,
                controlnet=net,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            extra = {"image": condition}
        else:
            extra = {}
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return pipe(
                prompts, height=16, width=16, num_inference_steps=args.steps, guidance_scale=1.0,
                generator=generator, output_type="latent", **extra,
            ).images  # fmt: skip

    def scaled(x, reference):
        low, high = reference.amin(), reference.amax()
        return ((x - low) / (high - low)).clamp(0, 1)

    def effect(model, net):
        torch.manual_seed(0)
        sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 8, 64)
        with torch.no_grad():
            down, mid = net(sample, t, text, controlnet_cond=condition, return_dict=False)
            plain = model.module(sample, t, text).sample
            steered = model.module(
                sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
            ).sample
        return (steered - plain).flatten()

    reference = {seed: latents(original, controlnet, seed) for seed in range(args.seeds)}
    reference_plain = {seed: latents(original, None, seed) for seed in range(args.seeds)}
    original_effect = effect(original, controlnet)
    rows = []
    for layout in ("free", "diffusers"):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            out = work / f"pruned-{layout}-{ratio}"
            result = invoke(
                "prune", folder, "--criterion", "magnitude", "--ratio", ratio, "--layout", layout, "-o", out
            )
            assert result.exit_code == 0, result.stderr
            sliced_folder = work / f"controlnet-{layout}-{ratio}"
            sliced_report = invoke(
                "slice", work / "controlnet", "--model", out, "-o", sliced_folder, "--json"
            ).json
            pruned, sliced = dpcli.load(out), load_controlnet(sliced_folder)
            ssim = [
                ssim_psnr(
                    scaled(latents(pruned, sliced, s), reference[s]), scaled(reference[s], reference[s])
                )["ssim"]
                for s in range(args.seeds)
            ]
            ssim_plain = [
                ssim_psnr(
                    scaled(latents(pruned, None, s), reference_plain[s]),
                    scaled(reference_plain[s], reference_plain[s]),
                )["ssim"]
                for s in range(args.seeds)
            ]
            cosine = float(
                torch.nn.functional.cosine_similarity(effect(pruned, sliced), original_effect, dim=0)
            )
            rows.append(
                {
                    "layout": layout,
                    "ratio": ratio,
                    "params_fraction": sum(p.numel() for p in pruned.module.parameters())
                    / sum(p.numel() for p in original.module.parameters()),
                    "controlnet_outputs_sliced": sliced_report["modules_sliced"],
                    "ssim_latents": sum(ssim) / len(ssim),
                    "ssim_latents_per_seed": ssim,
                    "ssim_latents_no_controlnet": sum(ssim_plain) / len(ssim_plain),
                    "controlnet_effect_cosine": cosine,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    record = {"machine": machine_info(torch_info=False), "args": vars(args), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "slice_controlnet.json").write_text(json.dumps(record, indent=2))
    print(
        "| layout | ratio | UNet params | SSIM latents, pruned + sliced ControlNet vs original pair | "
        "SSIM latents, UNets alone | cosine of the ControlNet's effect |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['ratio']} | {r['params_fraction']:.0%} | {r['ssim_latents']:.3f} | "
            f"{r['ssim_latents_no_controlnet']:.3f} | {r['controlnet_effect_cosine']:.3f} |"
        )


if __name__ == "__main__":
    main()
