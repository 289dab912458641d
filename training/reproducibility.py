"""Bitwise reproducible training steps (``--deterministic``) and the job's thread count.

What makes two CPU runs of one job differ, as measured on an Intel Xeon with AMX (2 cores):

- the thread count: another count is another order of float reductions (1 vs 2 threads: equal
  for two steps, 1e-6 apart at the third, 1e-2 by the eighth). The count is recorded in every
  checkpoint (``config.threads``); a ``--deterministic`` resume takes it back;
- Intel MKL (linked into torch's CPU library; ``torch.log`` and other vector math go through
  it) chooses its code path at run time unless its Conditional Numerical Reproducibility mode is
  on: seen as a first-step loss of 39.708771 instead of 39.708748 in about one run of four,
  and once within one process on the same inputs. ``--deterministic`` turns that mode on
  (``mkl_cbwr_set(AUTO | STRICT)``: the same code path for this CPU, whatever the alignment of
  the data or the threads MKL would pick), and MKL's dynamic thread choice off;
- kernels that torch knows to be nondeterministic (mostly CUDA ones): ``--deterministic``
  makes torch use deterministic ones or fail (``torch.use_deterministic_algorithms``), with
  cuDNN's autotuning off.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("train")

MKL_CBWR_ALL = -1
MKL_CBWR_BRANCH_OFF = 1  # MKL's default: the code path chosen at run time
MKL_CBWR_AUTO = 2  # the best code path for this CPU, always the same
MKL_CBWR_STRICT = 0x10000  # the same results whatever the number of threads
MKL_CBWR_ENV = ("MKL_CBWR", "AUTO,STRICT")  # the same, read by MKL at its first call


def set_threads(threads: int | None) -> int:
    """The process's intra-op CPU threads: ``threads``, else torch's own choice; returns it."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_deterministic(device: torch.device) -> dict[str, object]:
    """Every step of this process reproducible from its inputs; returns what was set."""
    if device.type == "cuda":
        # cuBLAS's deterministic workspace; read when its first handle is made (not yet here)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
    return {"deterministic_algorithms": True, "mkl": mkl_reproducible()}


def mkl_reproducible() -> str:
    """MKL's reproducible mode on and its dynamic threads off, through the functions that
    torch's CPU library exports; what it says when it cannot (another build of torch)."""
    mkl = _torch_cpu_library()
    try:
        get, set_ = mkl.mkl_serv_cbwr_get, mkl.mkl_serv_cbwr_set
    except AttributeError:
        log.warning(
            "--deterministic: this torch exports no MKL reproducibility switch; MKL_CBWR=AUTO,STRICT "
            "in the environment does the same"
        )
        return "not available"
    get.argtypes, set_.argtypes = [ctypes.c_int], [ctypes.c_int]
    wanted = MKL_CBWR_AUTO | MKL_CBWR_STRICT
    # MKL takes its mode at its first call only (an import may make it): the entry point sets
    # MKL_CBWR=AUTO,STRICT before any import (MKL_CBWR_ENV); the call is for other callers
    status = 0 if get(MKL_CBWR_ALL) == wanted else set_(wanted)
    if status != 0 or get(MKL_CBWR_ALL) != wanted:
        log.warning(
            "--deterministic: MKL refused its reproducible mode (status %d; it was used before: "
            "set %s=%s in the environment)",
            status,
            *MKL_CBWR_ENV,
        )
        return f"refused ({status})"
    if hasattr(mkl, "MKL_Set_Dynamic"):  # the C entry (mkl_set_dynamic is Fortran's, by pointer)
        mkl.MKL_Set_Dynamic.argtypes = [ctypes.c_int]
        mkl.MKL_Set_Dynamic(0)
    return "AUTO,STRICT"


def _torch_cpu_library() -> ctypes.CDLL:
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    return ctypes.CDLL(str(path)) if path.exists() else ctypes.CDLL(None)


def resume_threads(recorded: int | None, deterministic: bool) -> int:
    """The thread count to go on with after a resume: the checkpoint's under ``--deterministic``
    (another count takes another path), else this process's, said when they differ."""
    now = torch.get_num_threads()
    if not recorded or recorded == now:
        return now
    if deterministic:
        log.warning(
            "--deterministic: resuming with the checkpoint's %d CPU threads (this process had %d)",
            recorded,
            now,
        )
        return set_threads(recorded)
    log.warning(
        "the checkpoint was written with %d CPU threads, this process has %d: the steps from "
        "here follow another order of float reductions (--deterministic or --threads %d keeps it)",
        recorded,
        now,
        recorded,
    )
    return now
