"""Run bergson commands for the interop tests in forked children of one warm process.

Started by ``tests/anchor.py`` with bergson's own venv interpreter. Importing bergson
(torch, transformers, datasets, peft, bitsandbytes) costs ~8 s of the ~10 s a tiny
``bergson build`` takes on the 2-core CI machine; this process pays it once per test
session and then forks one child per request, which runs exactly what a fresh
``bergson ...`` or ``python -c ...`` process would, in the request's working directory
and environment, with its output in the request's files.

Protocol, one JSON object per line: a request on stdin
``{"argv": [...], "env": {...}, "cwd": str, "stdout": path, "stderr": path}`` (argv is
``["bergson", *args]`` or ``["python", "-c", code, *args]``) is answered on stdout by
``{"pid": n}`` when the child starts and ``{"rc": code}`` when it ends. EOF on stdin
ends the server.

Never imported by the test process (it runs only in bergson's venv).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import traceback


def _run(argv: list[str]) -> object:
    """The child's program: bergson's console script or ``python -c``."""
    if argv[0] == "bergson":
        from bergson.__main__ import main

        sys.argv = ["bergson", *argv[1:]]
        return main()
    if argv[:2] == ["python", "-c"]:
        sys.argv = ["-c", *argv[3:]]
        exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
        return 0
    raise ValueError(f"the fork server runs `bergson ...` or `python -c ...`, not {argv[:2]}")


def _exit_code(result: object) -> int:
    if result is None:
        return 0
    if isinstance(result, int):
        return result
    print(result, file=sys.stderr)  # sys.exit("message"), as the interpreter does
    return 1


def _child(req: dict) -> None:
    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills everything it started
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out = os.open(req["stdout"], flags, 0o644)
        err = out if req["stderr"] == req["stdout"] else os.open(req["stderr"], flags, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = sys.__stdout__  # fd 1 again (the server pointed sys.stdout at stderr)
        try:
            code = _exit_code(_run(req["argv"]))
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what a normal interpreter exit would run
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    # Replies get their own copy of stdout; whatever the imports print (bitsandbytes logs
    # a warning to stdout) goes to stderr, the server's log, and never into the protocol.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import bergson.__main__  # noqa: F401  (the import every child then inherits)

    for line in sys.stdin:
        req = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
