"""Connecting to Ray: start an embedded runtime or join a cluster, within a deadline.

State: only :class:`EmbeddedRuntime`'s count of the executors of this process that share the
runtime one of them started (the last to close shuts it down).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import numpy as np
import ray

from ...errors import ClusterError
from .options import RayOptions


class EmbeddedRuntime:
    """The Ray runtime an executor of this process started, shared by every executor that
    joined it: it is shut down when the last of them closes, not when the first does."""

    lock = threading.Lock()
    node_id: str | None = None  # the runtime's head node (a new runtime has a new one)
    users = 0

    @classmethod
    def join(cls, started: bool) -> str | None:
        """Count an executor in; returns the runtime's node id if it uses the embedded one."""
        node = ray.get_runtime_context().get_node_id()
        with cls.lock:
            if started:  # this executor started it (any earlier one was shut down)
                cls.node_id, cls.users = node, 1
                return node
            if cls.node_id is not None and node == cls.node_id:
                cls.users += 1
                return node
            return None  # a runtime the user started or joined: never ours to shut down

    @classmethod
    def leave(cls, node: str) -> None:
        """Count an executor out; the last one shuts the runtime down."""
        with cls.lock:
            if node != cls.node_id:
                return  # that runtime is gone already (shut down by the user)
            cls.users -= 1
            if cls.users > 0:
                return
            cls.node_id, cls.users = None, 0
        if ray.is_initialized():
            ray.shutdown()


def connect(options: RayOptions, timeout: float, init_kwargs: dict[str, Any]) -> bool:
    """Start or join Ray as ``options.address`` says; True when this call started a runtime.

    Joining gives up after ``timeout`` seconds in all (reachability probe, token check and
    ``ray.init`` together) with a ``ClusterError``."""
    if ray.is_initialized():
        return False
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("log_to_driver", True)
    init_kwargs.setdefault("configure_logging", False)
    if options.address is None:
        cpus = machine_cpus()
        need = int(np.ceil(options.resources.get("CPU", 1) * options.num_workers))
        if (
            max(options.num_workers, need) > cpus
            and not options.oversubscribe
            and "num_cpus" not in init_kwargs
        ):
            # Each worker is a process: past the CPU count they only add memory and
            # contention (1000 workers meant ~90 processes and 6 GB before Ray gave up).
            raise ClusterError(
                f"{options.num_workers} workers need {max(options.num_workers, need)} CPUs but this "
                f"machine has {cpus}; an embedded Ray runs each worker as a process of its "
                f"own, so lower num_workers to at most {cpus}, join a cluster with "
                "address=..., or pass oversubscribe=True (CLI: --oversubscribe)"
            )
        init_kwargs.setdefault("num_cpus", max(cpus, need))
        # "local" starts a new runtime even when another cluster runs on this machine.
        ray.init(address="local", **init_kwargs)
        return True
    # One deadline for the whole connection: the probe, the token check and ray.init.
    deadline = time.monotonic() + timeout
    check_reachable(options.address, timeout)
    done: dict[str, Any] = {}
    abandoned = threading.Event()
    decided = threading.Lock()  # connected-in-time and given-up are mutually exclusive
    address = options.address

    def join() -> None:
        try:
            check_token(address, max(deadline - time.monotonic(), 0.1))
            if abandoned.is_set():
                return
            ray.init(address=address, **init_kwargs)
            with decided:
                if abandoned.is_set():  # the caller has given up: do not stay connected
                    ray.shutdown()
                    return
                done["ok"] = True
        except BaseException as e:  # reported to the caller below
            done["error"] = e

    # Ray's own connection retries have no overall bound, so wait in another thread.
    t = threading.Thread(target=join, daemon=True, name="distgraph-connect")
    t.start()
    t.join(max(deadline - time.monotonic(), 0.0))
    with decided:
        if "ok" in done:
            return False
        abandoned.set()
    err = done.get("error")
    if isinstance(err, ClusterError):
        raise err
    hint = ""
    text = (
        f"{type(err).__name__}: {err}" if err else f"no answer within connect_timeout={timeout:g} s"
    )
    if (
        err is None
        or isinstance(err, ConnectionError)
        or "auth" in text.lower()
        or "token" in text.lower()
    ):
        hint = (
            "; if the cluster uses token authentication, check that RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN match the cluster's token"
        )
    raise ClusterError(f"could not connect to Ray at {options.address!r}: {text}{hint}")


#: The HTTP/2 client preface and an empty SETTINGS frame: what a gRPC client sends first.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_reachable(address: str, timeout: float) -> None:
    """Fail within ``timeout`` when nothing at ``address`` answers like Ray's GCS would.

    The GCS is a gRPC server: it sends its HTTP/2 settings as soon as a connection opens. A
    port that accepts and then stays silent would hold Ray's own client for minutes, so
    silence is refused here. Any answer at all (a TLS alert included) passes: ray.init then
    reports in its own words.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"could not connect to Ray at {address!r}: expected 'host:port', 'auto' or 'ray://host:port'"
        )
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: the connection did not open within "
            f"connect_timeout={timeout:g} s (is the head node running and reachable?)"
        ) from None
    except OSError as e:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: {e} (is the head node running and reachable?)"
        ) from None
    with sock:
        try:
            sock.sendall(_H2_PREFACE)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.recv(1)  # b"" (the peer closed) counts as an answer too
        except TimeoutError:
            raise ClusterError(
                f"could not connect to Ray at {address!r}: no answer within "
                f"connect_timeout={timeout:g} s (something accepts connections there but never "
                "answers like a Ray head node; is this the GCS port, 6379 by default?)"
            ) from None
        except OSError:  # reset by the peer, say: an answer of sorts; ray.init will explain
            pass


def check_token(address: str, timeout: float = 5.0) -> None:
    """Ask the GCS once before ray.init, whose own retries would hide a refused token."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    try:
        # Ray's CLI probes the same way (ray health-check). The compiled module has GcsClient
        # (Ray imports it from there too); its _raylet.pyi lists only the id types and ObjectRef.
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
    except ImportError:
        return
    try:
        GcsClient(address=address).internal_kv_get(
            b"distgraph-probe", None, timeout=min(timeout, 5.0)
        )
    except ray.exceptions.AuthenticationError as e:
        raise ClusterError(
            f"could not connect to Ray at {address!r}: the cluster refused the authentication "
            f"token ({str(e).splitlines()[0][:160]}); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "to the cluster's token"
        ) from None
    except Exception:  # anything else: let ray.init report it in its own words
        return


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
