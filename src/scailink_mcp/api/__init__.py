"""The REST surface: Starlette routes, one module per resource. Routes translate HTTP to calls on
`remote/*` (and later `desktop/*`); they raise `ScaiLinkError`s and never build error dicts."""
