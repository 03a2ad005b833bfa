"""Generation speed of a distilled student against its teacher, through the same stock diffusers pipeline.

    python benchmarks/inference_speed.py --teacher PATH --student PATH [--student_steps 1] [--teacher_steps 25]
        [--guidance_scale 5.0] [--prompt "a handwritten digit seven"] [--batch_size 4] [--repeats 5] [--out DIR]

Both folders are loaded with stock ``DiffusionPipeline.from_pretrained`` (no dmdx code on the generation path).
The teacher runs ``teacher_steps`` with CFG (2 network evaluations per step), the student its own steps without
CFG. Each is warmed up once, then timed ``repeats`` times alternately (so drift on a noisy machine hits both
alike); the median is reported. Prints and writes ``inference_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Teacher pipeline folder or Hub id.")
    parser.add_argument("--student", required=True, help="Student pipeline folder or Hub id.")
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--student_steps", type=int, default=None,
                        help="Default: the student's training steps from its training_config.json, else 1.")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="Teacher CFG scale (student uses 0).")
    parser.add_argument("--prompt", default="a handwritten digit seven")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="Default: the pipeline's own default size.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default=None, help="Folder for inference_speed.json.")
    return parser.parse_args(argv)


def student_steps_from_config(path: str) -> int | None:
    """The step count the student was trained for, from the training_config.json every dmdx script writes."""
    config_path = os.path.join(path, "training_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        return config.get("num_student_steps")
    return None


def time_call(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    from diffusers import DiffusionPipeline

    dtype = getattr(torch, args.dtype)
    student_steps = args.student_steps or student_steps_from_config(args.student) or 1
    runs = {
        "teacher": (args.teacher, args.teacher_steps, args.guidance_scale),
        "student": (args.student, student_steps, 0.0),
    }
    pipes = {}
    for name, (path, _, _) in runs.items():
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe

    def call(name):
        _, steps, guidance = runs[name]
        size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
        generator = torch.Generator("cpu").manual_seed(0)
        return lambda: pipes[name]([args.prompt] * args.batch_size, num_inference_steps=steps,
                                   guidance_scale=guidance, generator=generator, output_type="pt", **size)

    calls = {}
    for name in runs:  # warm-up, counting the denoiser's forward calls (CFG batches both halves into one call)
        denoiser = getattr(pipes[name], "unet", None) or pipes[name].transformer
        handle = denoiser.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
        call(name)()
        handle.remove()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            times[name].append(time_call(call(name), args.device))

    result = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size, "repeats": args.repeats}
    for name, (path, steps, guidance) in runs.items():
        median = statistics.median(times[name])
        result[name] = {
            "path": path, "steps": steps, "guidance_scale": guidance,
            "nfe": steps * (2 if guidance > 1.0 else 1), "denoiser_calls": calls[name],
            "seconds_per_batch": median, "seconds_per_image": median / args.batch_size,
        }
    result["speedup"] = result["teacher"]["seconds_per_image"] / result["student"]["seconds_per_image"]

    print(f"{'pipeline':<10}{'steps':>6}{'NFE':>6}{'s/image':>12}")
    for name in runs:
        r = result[name]
        print(f"{name:<10}{r['steps']:>6}{r['nfe']:>6}{r['seconds_per_image']:>12.5f}")
    print(f"speedup (teacher s/image / student s/image): {result['speedup']:.1f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "inference_speed.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
