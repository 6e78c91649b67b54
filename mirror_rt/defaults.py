"""The one table of default settings: the library's decoders, the CLI, the demo and the benches
all read it, so a setting has one value everywhere unless a caller passes another.

Mirror-SD's values are the ones tuned for the embedded default pair on a CPU (bench/RESULTS.md,
"Why the defaults"): a short window and few exit candidates, because on a CPU the draft's branch
rollouts compete with the target for the same cores; a ranked branch floor, so that branches the
exit head rarely sees adopted are not rolled out; and fallback "exit", so that a miss starts the
next step at once instead of waiting for a fresh window.
"""
from __future__ import annotations

# --- the algorithm (MirrorConfig, SpeculativeDecoder) ------------------------------------------------
WINDOW = 3                 # gamma: draft tokens per window (SD and Mirror-SD)
MAX_WINDOW = 32            # the longest window either decoder accepts (a rollout tree must fit the mask)
KAPPA = 2                  # exit candidates per position (Mirror-SD)
BRANCH_POLICY = "ranked"   # "ranked" or "per_position" (decoders/mirror_exit.py)
MIN_BRANCH_PROB = 0.05     # ranked branches the exit head puts below this are not rolled out
FALLBACK = "exit"          # after a miss: "exit" (start at once, empty window) or "recompute" (the paper)
MODE = "rejection"         # acceptance rule when sampling: "rejection" keeps windows alive at temperature > 0
PLAN = "auto"              # "auto": the planner picks window/kappa/overlap per step; "fixed": the config's
EXIT_VOCAB = "draft"       # the exit scores the draft's (reduced) vocabulary only

# --- where the draft runs (Placement) -----------------------------------------------------------------
LANE = "auto"              # library: a worker thread for a CPU draft, a stream for a CUDA one
LANE_TIMEOUT = 120.0       # seconds before a silent draft lane counts as failed
COMPILE = "auto"           # mirror_rt.compiled.prepare: compiled where it measured faster

# --- what the command-line tools (generate, demo, bench) switch on, the library leaves off ------------
# A process lane needs the caller's script under `if __name__ == "__main__":` (spawn), which a
# library default cannot assume; the tools are such scripts, and without the GIL the CPU overlap is
# real (bench/RESULTS.md, "Why the defaults").
CLI_CPU_LANE = "process"
# Context lookup: a window copied from the context first (greedy only; decoders/lookup.py).
CLI_LOOKUP = 4
CLI_LOOKUP_WINDOW = 0      # 0: a copied window as long as the draft's
# A draft window ends before the first token the draft is unsure of: with a weak draft a full
# window costs draft passes and verified rows for nothing. Needs a draft whose confidence means
# something, so the library keeps full windows (0).
CLI_MIN_DRAFT_PROB = 0.6
