"""Run a script and SIGKILL it at the N-th call of a named function: the fault-injection harness of test_faults.py.

    python tests/kill_at.py FILE_SUFFIX:FUNCTION N script.py [script flags...]

FILE_SUFFIX:FUNCTION names a Python function by the end of its file's path and its name
(`common/generation.py:generate`), or a built-in function by `builtin:MODULE.NAME` (`builtin:os.replace`).
The process kills itself with SIGKILL, as an out-of-memory killer or a preempted machine would:
no exception, no cleanup, no `finally`.
"""
import os
import runpy
import signal
import sys
import threading


def main():
    target, count, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    where, name = target.split(":")
    builtin = None
    if where == "builtin":  # the function object itself: a name alone would also match str.replace
        module, attr = name.rsplit(".", 1)
        builtin = getattr(__import__(module), attr)
    seen = 0

    def profile(frame, event, arg):
        nonlocal seen
        if event == "call":
            hit = frame.f_code.co_name == name and frame.f_code.co_filename.endswith(where)
        elif event == "c_call":
            hit = builtin is not None and arg is builtin
        else:
            return
        if hit:
            seen += 1
            if seen == count:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.argv = sys.argv[3:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.setprofile(profile)
    threading.setprofile(profile)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
