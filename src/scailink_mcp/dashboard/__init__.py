"""The admin dashboard (SPEC section 11): server-rendered pages at `/dashboard/` over the same parts
and business functions as the REST API, with a cookie session, CSRF tokens and a strict CSP.

Must not: hold a rule of its own about who may do what (the registry, the catalog, the gateway and
the audit log decide, as for REST), or render a token or a credential value.
"""

from scailink_mcp.dashboard.app import create_dashboard, find_dashboard, home_redirect

__all__ = ["create_dashboard", "find_dashboard", "home_redirect"]
