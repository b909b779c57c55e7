"""One process of the pairs task's multi-process test (``tests/test_multihost_pairs.py``).

``python tests/multihost_pairs_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR`` runs
``train.py --distributed`` with :func:`get_config` (the tiny pairs config with hard
negatives mixed in, data parallel over processes and FSDP over each process's devices)
and prints ``RESULT<final_metrics.json>`` on process 0. The test's reference is the same
``train.py`` run in one process with 4 devices.
"""

import json
import os
import sys

STEPS = 6
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "text")


def get_config():
  """The config of both runs (``--config=tests/multihost_pairs_worker.py``)."""
  from testutil import tiny_text_config

  files = ",".join(os.path.join(EXAMPLES, f) for f in ("train_pairs.jsonl",
                                                      "train_hard_negatives.jsonl"))
  return tiny_text_config(train_file=files, train_weights=(2.0, 1.0), batch_size=8,
                          mesh_shape=(-1, 2), fsdp_min_size=64, num_train_steps=STEPS,
                          checkpoint_every_steps=3, log_every_steps=3, eval_every_steps=STEPS,
                          batch_sampler="no_duplicates", input_workers=0)


if __name__ == "__main__":
  pid, nproc, port, workdir = sys.argv[1:]
  from absl import flags

  import train

  argv = ["train.py", f"--config={__file__}", f"--workdir={workdir}",
          "--distributed", f"--coordinator_address=localhost:{port}",
          f"--num_processes={nproc}", f"--process_id={pid}"]
  flags.FLAGS(argv)
  train.main(argv[:1])
  if int(pid) == 0:
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      print("RESULT" + f.read().replace("\n", " "))
    print(json.dumps({"done": True}))
