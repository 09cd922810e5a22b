"""Run per-file work on a Ray cluster: an ordered map over chunks, with one set-up per worker.

``predict``, ``evaluate`` and ``smear`` take ``--ray ADDRESS`` to spread their per-file (or
per-field) work over the CPUs of a Ray cluster (Moritz et al., "Ray: A Distributed Framework for
Emerging AI Applications", OSDI 2018). Each Ray worker is an actor that runs an expensive set-up
once (loading the ONNX or PyTorch model) and then takes chunks of files; results come back in the
order of the chunks, so the outputs are those of a local run, written by the driver as usual.

``ADDRESS`` is Ray's: ``local`` starts a private runtime on this machine (all its cores), ``auto``
joins the cluster this machine belongs to (``ray start --head`` here, or ``ray start
--address=HEAD:6379`` on each worker node), and ``HOST:PORT`` joins the cluster at that head. Every
node must see the input files and the model at the same paths (a shared file system) and run the
same malaria-screen install. Ray is an optional dependency (``pip install malaria-screen[ray]``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

__all__ = ["RayUnavailableError", "connect", "ray_map"]


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached; the message says which."""


def connect(address: str, *, num_cpus: Optional[int] = None) -> Any:
    """Start or join a Ray runtime (once per process) and return the ``ray`` module.

    Parameters
    ----------
    address : str
        ``"local"`` (a private runtime on this machine), ``"auto"`` (the cluster this node has
        joined with ``ray start``) or ``"HOST:PORT"`` / ``"ray://HOST:10001"`` (that cluster's head).
    num_cpus : int, optional
        CPUs of a ``"local"`` runtime; default all.

    Raises
    ------
    RayUnavailableError
        If Ray is not installed or the cluster cannot be joined.
    """
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("--ray needs Ray: pip install 'malaria-screen[ray]'") from exc
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        raise RayUnavailableError(f"cannot start or join the Ray cluster at {address!r}: {exc}") from exc
    return ray


class _Worker:
    """A Ray actor: ``setup(*args)`` once, then ``fn(state, chunk)`` per call."""

    def __init__(self, setup: Callable[..., Any], args: tuple) -> None:
        self.state = setup(*args)

    def run(self, fn: Callable[[Any, Any], Any], chunk: Any) -> Any:
        return fn(self.state, chunk)


def ray_map(fn: Callable[[Any, Any], Any], chunks: Sequence[Any], *, setup: Callable[..., Any], setup_args: Iterable = (),
            workers: Optional[int] = None, cpus_per_worker: float = 1.0) -> Iterator[Any]:
    """``fn(state, chunk)`` for every chunk on Ray actors, results in the order of ``chunks``.

    Needs a runtime started by :func:`connect`. ``fn`` and ``setup`` must be importable,
    module-level functions (Ray pickles them by reference) and their arguments picklable.

    Parameters
    ----------
    fn : callable
        ``fn(state, chunk) -> result``, run on a worker.
    chunks : sequence
        The work, one item per call (e.g. a list of file paths).
    setup : callable
        ``setup(*setup_args) -> state``, run once on each worker (e.g. load the model).
    setup_args : iterable
    workers : int, optional
        Actors; default the cluster's CPUs divided by ``cpus_per_worker``, at most ``len(chunks)``.
    cpus_per_worker : float, default=1
        CPUs Ray reserves for each actor.

    Yields
    ------
    result
        ``fn``'s result for each chunk, in order.

    Raises
    ------
    RayUnavailableError
        If no Ray runtime is running.
    Exception
        An exception raised by ``fn`` or ``setup`` on a worker (Ray's ``RayTaskError`` wrapping it).
    """
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        raise RayUnavailableError("no Ray runtime: call connect() first")
    if not chunks:
        return
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))
    actor_cls = ray.remote(num_cpus=cpus_per_worker)(_Worker)
    actors = [actor_cls.remote(setup, tuple(setup_args)) for _ in range(max(1, min(workers, len(chunks))))]
    try:
        yield from ActorPool(actors).map(lambda a, c: a.run.remote(fn, c), list(chunks))
    finally:
        for a in actors:
            ray.kill(a)
