"""`dispatch serve`: the monitor, a web page and JSON API over the same services (SPEC §8)."""

from __future__ import annotations

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation
from dispatch.errors import UsageError


def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port (0: any free one)."),
    sweep_every: str = typer.Option(
        "60s", "--sweep-every", metavar="DURATION", help="Run the sweep this often (0: never)."
    ),
    open_: bool = typer.Option(False, "--open", help="Open the page in a browser."),
    new_token: bool = typer.Option(False, "--new-token", help="Replace the kept token."),
) -> None:
    """Serve the monitor: a web page and JSON API over every task.

    Prints the page's URL, with the access token in its fragment, as the first line;
    runs until Ctrl-C or SIGTERM. The token is kept in $DISPATCH_HOME/serve-token.
    """
    from dispatch.config import parse_duration
    from dispatch.web.server import serve as run_server

    try:
        every = parse_duration(sweep_every)
    except ValueError as exc:
        raise UsageError(f"--sweep-every: {exc}") from None

    def announce(url: str) -> None:
        out.line(url)
        if open_:
            import webbrowser

            webbrowser.open(url)

    run_server(
        invocation(ctx).app(),
        host=host,
        port=port,
        sweep_every=every,
        new_token=new_token,
        on_url=announce,
    )
