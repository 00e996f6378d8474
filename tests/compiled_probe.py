"""A raw Ray Compiled Graph probe for the teardown hang (run as a script by test_compiled.py).

``python compiled_probe.py MODE STEPS FLOATS``: actor W returns a float32[FLOATS] array, actor S
copies it and returns a float, ``STEPS`` times, then the graph is torn down on a thread. MODE
``default`` keeps Ray's channel buffers (1 MB); ``sized`` sets ``buffer_size_bytes`` in the
driver and both actors before compiling (the fix), and compiles a second graph on the same
actors afterwards. Prints one ``teardown <seconds>`` or ``teardown HUNG`` line per graph; a hung
teardown is ended by killing the actors so the script itself always exits.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import ray
from ray.dag import InputNode
from ray.dag.context import DAGContext

WAIT = 5.0  # seconds a teardown gets before it counts as hung


def set_buffer(_self, nbytes):
    DAGContext.get_current().buffer_size_bytes = nbytes


@ray.remote(num_cpus=0)
class W:
    def __init__(self, floats):
        self.floats = floats

    def make(self, i):
        return np.full(self.floats, float(i), dtype=np.float32)


@ray.remote(num_cpus=0)
class S:
    def take(self, arr):
        kept = np.array(arr, copy=True)  # copy what is kept (ray-project/ray#46055)
        return float(kept[0])


def one_graph(w, s, steps):
    with InputNode() as inp:
        dag = s.take.bind(w.make.bind(inp))
    cdag = dag.experimental_compile()
    for i in range(steps):
        assert ray.get(cdag.execute(i)) == float(i)
    start = time.perf_counter()
    done = threading.Thread(target=cdag.teardown, daemon=True)
    done.start()
    done.join(WAIT)
    if done.is_alive():
        print("teardown HUNG", flush=True)
        ray.kill(w)  # ends the reader's wait; the teardown thread then returns
        ray.kill(s)
        done.join(60)
        return False
    print(f"teardown {time.perf_counter() - start:.2f}", flush=True)
    return True


def main():
    mode, steps, floats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # "local": always a Ray of its own, never a cluster another test left on this machine.
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    w, s = W.remote(floats), S.remote()
    ray.get([w.__ray_ready__.remote(), s.__ray_ready__.remote()])
    rounds = 1
    if mode == "sized":
        nbytes = 2 * 4 * floats + 256 * 1024
        set_buffer(None, nbytes)
        ray.get([a.__ray_call__.remote(set_buffer, nbytes) for a in (w, s)])
        rounds = 2  # a second graph on the same actors
    for _ in range(rounds):
        if not one_graph(w, s, steps):
            break
    ray.shutdown()


if __name__ == "__main__":
    main()
