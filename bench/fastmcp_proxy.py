"""The FastMCP proxy peer (`fastmcp` 4.x), run from its own virtualenv by `python -m bench`.

Run: `<venv>/bin/python bench/fastmcp_proxy.py --port P --upstream URL`.
"""

from __future__ import annotations

import argparse

from fastmcp.server.server import create_proxy  # type: ignore[import-not-found]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    proxy = create_proxy(args.upstream, name="fastmcp-proxy")
    proxy.run(transport="http", host="127.0.0.1", port=args.port, show_banner=False)


if __name__ == "__main__":
    main()
