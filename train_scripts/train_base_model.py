"""Train the embedded base model (shapes-sd15) from scratch on CPU and save it as a diffusers folder.

    pip install -e ".[world]"     # scikit-image, whose bundled sample photographs the photo family crops
    python train_scripts/train_base_model.py --out diffusion_lora/assets/shapes-sd15 --work out/base-work

--photos false trains without photographs (a different model). --work train_scripts/base_work
continues from the shipped run's checkpoints. The default plan is the shipped one: the closed world of
shape scenes, then the text encoder alone on natural rewordings of its captions (--reword-steps 3000).

Reproducible: the same plan and thread count give the same weights. A killed run continues from
the checkpoints in --work. Ends by scoring prompt following on the 100 held-out captions. On two
cores, stage 4 can run beside the UNet stage once --work/vae-sharp.pt exists:

    python train_scripts/train_base_model.py --out ... --work out/base-work --decoder-only --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from diffusion_lora.toy.evaluate import prompt_following
from diffusion_lora.toy.scenes import held_out_combos
from diffusion_lora.toy.train_base import BasePlan, polish_decoder_stage, train_base_model


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() in ("true", "1", "yes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the trained diffusers pipeline")
    parser.add_argument("--work", required=True, help="folder for checkpoints and cached latents")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the networks train, e.g. cuda (default: cpu)")
    parser.add_argument("--decoder-only", action="store_true",
                        help="run only stage 4 (needs --work/vae-sharp.pt), e.g. beside the UNet stage")
    for f in dataclasses.fields(BasePlan):
        kind = _flag if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    plan = BasePlan(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BasePlan)})
    if args.decoder_only:
        polish_decoder_stage(args.work, plan, args.device)
        return
    pipe = train_base_model(args.out, args.work, plan, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    score = prompt_following(pipe, held_out_combos())
    print(f"held-out prompt following: colour {score.colour:.0%}, shape {score.shape:.0%}")


if __name__ == "__main__":
    main()
