"""Collects runs/mcdit/{eval_*.json, fm_*.log, flops0_*.json} into
docs/results/assets/mc_dit/results.json (plus the sample grids) and a markdown table (printed).
python docs/mc_dit/make_table.py [runs/mcdit]"""
import json
import os
import re
import shutil
import sys

R = sys.argv[1] if len(sys.argv) > 1 else "runs/mcdit"
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "assets",
                   "mc_dit")
os.makedirs(OUT, exist_ok=True)
RUNS = [("dit", "dit", "N"), ("mdt", "mdt", "N"), ("mcdit", "mcdit", "N"), ("dit_2x", "dit", "2N")]
flops = {}
for arm in ("dit", "mdt", "mcdit"):
  for name in (f"flops_{arm}.json", f"flops0_{arm}.json"):
    p = os.path.join(R, name)
    if os.path.exists(p) and os.path.getsize(p):
      flops[arm] = json.load(open(p))
      break
rows, results = [], {"flops": flops, "runs": {}}
for run, arm, steps in RUNS:
  p = os.path.join(R, f"eval_{run}.json")
  if not os.path.exists(p) or not os.path.getsize(p):
    continue
  ev = json.load(open(p))
  log = open(os.path.join(R, f"fm_{run}.log")).read()
  m = re.search(r"wall_s ([\d.]+) user_s ([\d.]+)", log)
  wall, user = (float(m.group(1)), float(m.group(2))) if m else (float("nan"),) * 2
  rates = [float(x) for x in re.findall(r"\| ([\d.]+) steps/s", log)]
  n = ev["step"]
  f = flops.get(arm, {}).get("flops_per_step", float("nan"))
  h = ev["heldout"]
  levels = sorted((int(k.split("_t")[1]), v) for k, v in h.items() if k.startswith("denoise_loss_t"))
  ws = {k: v["classifier_frechet_distance"] for k, v in ev.items() if k.startswith("w")}
  p15 = os.path.join(R, f"eval_{run}_w15.json")       # a separate guided evaluation, if run
  if os.path.exists(p15) and os.path.getsize(p15):
    ws.update({k: v["classifier_frechet_distance"] for k, v in json.load(open(p15)).items()
               if k.startswith("w")})
  results["runs"][run] = {"arm": arm, "steps": n, "train_flops": f * n, "wall_s_incl_compile_eval":
                          wall, "user_s": user, "last_steps_per_s": rates[-1] if rates else None,
                          "heldout_L_G": h["denoise_loss"], "by_t": dict(levels), "fd": ws,
                          "fd_real_floor": ev["fd_real_train_vs_eval"],
                          "fd_num_samples": ev["fd_num_samples"]}
  for k, v in ev.items():
    if k.startswith("w"):
      src = v["grid_png"]
      if os.path.exists(src):
        shutil.copy(src, os.path.join(OUT, f"fmnist_{run}_step{n}_{k}.png"))
  rows.append((run, arm, n, f * n / 1e12, wall, rates[-1] if rates else float("nan"),
               h["denoise_loss"], levels, ws))
if os.path.exists(os.path.join(R, "bench.json")) and os.path.getsize(os.path.join(R, "bench.json")):
  results["bench_steps"] = json.load(open(os.path.join(R, "bench.json")))
json.dump(results, open(os.path.join(OUT, "results.json"), "w"), indent=2)
if rows:
  lv = [t for t, _ in rows[0][7]]
  print("| run | arm | steps | train TFLOP | wall s | steps/s (end) | L_G mean | "
        + " | ".join(f"t={t}" for t in lv) + " | FD w=1 | FD w=1.5 |")
  print("|" + "---|" * (9 + len(lv)))
  for run, arm, n, tf, wall, rate, lg, levels, ws in rows:
    print(f"| {run} | {arm} | {n} | {tf:.2f} | {wall:.0f} | {rate:.2f} | {lg:.4f} | "
          + " | ".join(f"{v:.4f}" for _, v in levels)
          + f" | {ws.get('w1', float('nan')):.1f} | {ws.get('w1.5', float('nan')):.1f} |")
