#!/usr/bin/env python3
"""Start N workers on one shared listening socket, passed the sd_listen_fds way.

A stand-in supervisor for benchmarks (no restarts): binds ADDR once, creates a balance table
(memfd, fd name "sdcluster-balance") unless --no-balance, forks N children with fds 3 (socket)
and 4 (table), LISTEN_FDS / LISTEN_PID (the child's own pid) / LISTEN_FDNAMES, and execs CMD.
With --reuseport it instead starts N workers that each bind ADDR with SO_REUSEPORT.
Prints the worker pids, one per line, then waits; SIGTERM/SIGINT are forwarded to workers.
"""
import argparse, os, signal, socket, sys

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--listen", default="127.0.0.1:8080")
    ap.add_argument("--no-balance", action="store_true", help="share the socket without a balance table")
    ap.add_argument("--reuseport", action="store_true", help="one SO_REUSEPORT socket per worker")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="worker command (after --)")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    host, port = a.listen.rsplit(":", 1)
    sock = table = None
    if not a.reuseport:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
        sock.listen(4096)
        sock.setblocking(False)
        if not a.no_balance:
            table = os.memfd_create("sdcluster-balance", 0)
    pids = []
    for i in range(1, a.workers + 1):
        pid = os.fork()
        if pid == 0:
            env = dict(os.environ, SDCLUSTER_INSTANCE=str(i))
            if a.reuseport:
                argv = cmd + ["--listen", a.listen, "--reuseport"]
            else:
                # dup above the target numbers first: dup2(3, 3) would keep close-on-exec
                fds = [os.dup(fd) for fd in [sock.fileno()] + ([table] if table is not None else [])]
                for n, fd in enumerate(fds):
                    os.dup2(fd, 3 + n, inheritable=True)
                env.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                           LISTEN_FDNAMES=":".join(["http", "sdcluster-balance"][: len(fds)]))
                argv = cmd
            os.execvpe(argv[0], argv, env)
        pids.append(pid)
        print(pid, flush=True)
    def forward(sig, _):
        for p in pids:
            try: os.kill(p, sig)
            except ProcessLookupError: pass
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for p in pids:
        _, st = os.waitpid(p, 0)
        status = status or os.waitstatus_to_exitcode(st)
    sys.exit(1 if status else 0)

if __name__ == "__main__":
    main()
