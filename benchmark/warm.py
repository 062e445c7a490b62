"""Run a script as `python script.py ...` would, in a process forked from one that has already imported torch and
transformers: the test suite's runs of the scripts start in a fraction of a second instead of ~4 s of imports.

    warm.Started([sys.executable, "grpo.py", "--flag", ...], cwd, env).wait(timeout)  # a CompletedProcess

Used by the test suite (tests/conftest.py) and benchmark/resets.py, which runs many short scripts.

The fork comes from multiprocessing's fork server, which imports the third-party modules below and nothing of the
project (common/ reads its environment at import, and each run brings its own), and never computes anything, so the
children start as fresh interpreters would: the script runs as `__main__` with its own argv, working folder,
environment, stdout and stderr (files, read back when it ends), sys.excepthook for uncaught exceptions, atexit
handlers at the end, and its exit status (a SIGKILL shows as -9, as with subprocess).

`python -m torch.distributed.run --nproc_per_node N --master_port P script.py ...` forks N such processes with the
environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
and, as torchrun does, ends the others when one fails; their outputs are joined in rank order.
"""
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

PRELOAD = ["numpy", "torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.modeling_auto", "accelerate", "tyro", "safetensors.torch", "tqdm.auto"]
_started = False
# multiprocessing reads a child's exit status once, from a pipe, and Process.start polls every unfinished child: two
# threads (tests run two scripts at once) must not poll the same child together, or one reads the status and the
# other an empty pipe (exit status 255)
_lock = threading.Lock()


def _context():
    """The fork server's context, started once with the preloaded modules and one thread per process (libgomp
    reads OMP_NUM_THREADS when it loads, so the server must see it)."""
    global _started
    context = multiprocessing.get_context("forkserver")
    if not _started:
        context.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        _started = True
    return context


def _child(argv, cwd, env, out_path, err_path):
    """The forked process: become `python argv[1:]` and exit with its status."""
    import atexit
    import runpy

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    script = argv[1]
    sys.argv = list(argv[1:])
    sys.path[:0] = [os.path.dirname(os.path.abspath(script))] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p]
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
    os._exit(code)


LAUNCHER = ["-m", "torch.distributed.run", "--nproc_per_node"]


def can_run(args) -> bool:
    """Whether `args` is a command these runs take: `python script.py ...` or torchrun's form above."""
    args = [str(a) for a in args]
    if len(args) < 2 or args[0] != sys.executable:
        return False
    if args[1:4] == LAUNCHER:
        return len(args) > 7 and args[5] == "--master_port" and args[7].endswith(".py")
    return args[1].endswith(".py")


class Started:
    """A script running in forked processes; `wait` gives its CompletedProcess (text stdout and stderr)."""

    def __init__(self, args, cwd, env):
        self.args = [str(a) for a in args]
        if not can_run(self.args):
            raise ValueError(f"warm runs take `python script.py ...` or torchrun's form, not {self.args[:4]}")
        if self.args[1:4] == LAUNCHER:
            count, port, argv = int(self.args[4]), self.args[6], [self.args[0], *self.args[7:]]
            envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(count), "LOCAL_WORLD_SIZE":
                     str(count), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                    for r in range(count)]
        else:
            argv, envs = self.args, [dict(env)]
        self.folder = tempfile.TemporaryDirectory(prefix="warm")
        self.outputs = [(os.path.join(self.folder.name, f"out{r}"), os.path.join(self.folder.name, f"err{r}"))
                        for r in range(len(envs))]
        with _lock:
            self.processes = [_context().Process(target=_child, args=(argv, str(cwd), e, out, err))
                              for e, (out, err) in zip(envs, self.outputs)]
            for process in self.processes:
                process.start()

    def _alive(self):
        with _lock:
            return [p.is_alive() for p in self.processes], [p.exitcode for p in self.processes]

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            alive, codes = self._alive()
            while any(alive):
                failed = any(c not in (None, 0) for c in codes)
                if failed or (deadline is not None and time.monotonic() > deadline):
                    with _lock:  # torchrun ends the others when one fails; a time-out ends all
                        for p in self.processes:
                            if p.is_alive():
                                p.kill()
                        for p in self.processes:
                            p.join()
                    if not failed:
                        raise subprocess.TimeoutExpired(self.args, timeout, *self._read())
                    break
                time.sleep(0.05)
                alive, codes = self._alive()
            codes = self._alive()[1]
            code = next((c for c in codes if c not in (0, -signal.SIGKILL)), None) or next(
                (c for c in codes if c != 0), 0)
            return subprocess.CompletedProcess(self.args, code, *self._read())
        finally:
            self.folder.cleanup()

    def _read(self):
        texts = []
        for i in range(2):
            parts = []
            for paths in self.outputs:
                with open(paths[i], errors="replace") as f:
                    parts.append(f.read())
            texts.append("".join(parts))
        return texts

