"""`g3export serve` and `g3export triton-repo`: a build served by Triton Inference Server
(g3export.serving). Registered on the group by g3export.cli.
"""

from __future__ import annotations

import tempfile

import click

from .cli_common import friendly


@click.command("triton-repo")
@click.argument("build_dir", type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="Model repository directory.")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences served at once (slots of the session's cache).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--build-path", default=None,
              help="The build's path as the server sees it (e.g. /build in a container); "
                   "default: BUILD_DIR's absolute path.")
@click.option("--copy-build", is_flag=True, help="Copy the build into the repository.")
@click.option("--force", is_flag=True, help="Replace an existing gemma3 model in OUT.")
@friendly
def triton_repo(build_dir, out, max_batch, provider, build_path, copy_build, force):
    """Write a Triton Inference Server model repository (model `gemma3`) serving BUILD_DIR."""
    from .serving.repo import write_repository

    path = write_repository(build_dir, out, max_batch=max_batch, provider=provider,
                            build_path=build_path, copy_build=copy_build, force=force)
    click.echo(f"wrote {path / 'gemma3'}")


@click.command()
@click.argument("build_dir", type=click.Path())
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--verbose", is_flag=True, help="Triton's verbose log.")
@friendly
def serve(build_dir, port, host, max_batch, provider, verbose):
    """Serve BUILD_DIR with Triton Inference Server (HTTP, generate / generate_stream)."""
    import signal
    from .serving.repo import write_repository
    from .serving.server import TritonServer, find_tritonserver

    install = find_tritonserver()  # says what to install before any work
    with tempfile.TemporaryDirectory(prefix="g3export-repo-") as repo:
        write_repository(build_dir, repo, max_batch=max_batch, provider=provider)
        server = TritonServer(repo, port=port, host=host, install=install, verbose=verbose,
                              log=None)

        def stop(*_):
            raise KeyboardInterrupt
        # SIGINT too, explicitly: a process started by `cmd &` from a non-interactive shell
        # (CI scripts, nohup-style launches) inherits SIGINT *ignored*, and Python then installs
        # no KeyboardInterrupt handler, so Ctrl-C / `kill -INT` would do nothing
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            server.start()
            click.echo(f"serving {build_dir} at {server.url}/v2/models/gemma3/generate_stream "
                       "(Ctrl-C stops)", err=True)
            server.proc.wait()
            raise click.ClickException(f"tritonserver exited ({server.proc.returncode}):\n"
                                       f"{server.log_tail()}")
        except KeyboardInterrupt:
            # stop first, then say so: a write to a stderr nobody reads any more (a full pipe)
            # must not keep the server running
            server.stop()
            click.echo("stopped", err=True)
        finally:
            server.stop()  # idempotent: after a KeyboardInterrupt it has nothing left to do
