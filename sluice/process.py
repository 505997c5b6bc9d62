"""Child-process plumbing shared by the launcher and the tensor-parallel rank spawner."""
import signal


def die_with_parent() -> None:
    """`preexec_fn` for a child that must not outlive the process that started it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
