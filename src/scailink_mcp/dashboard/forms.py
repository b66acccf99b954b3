"""Forms of the registry pages -> the REST bodies (`RegisterServer`, `UpdateServer`, `CredentialValue`),
validated by the same pydantic models, and a `ScaiLinkError` -> the messages shown next to each field.

Secret values from a form go into the body model only; a form re-rendered after an error never carries
them back (`FormValues` holds no credential value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from scailink_mcp.dashboard.web import Form
from scailink_mcp.errors import (
    Conflict,
    EndpointForbidden,
    ScaiLinkError,
    ValidationFailed,
    from_validation,
)
from scailink_mcp.remote.schemas import CredentialValue, RegisterServer, UpdateServer

M = TypeVar("M", bound=BaseModel)
CREDENTIAL_ROWS = 2
SERVER_FIELDS = ("name", "description", "endpoint_url", "transport", "auth_type", "consent_tier")
EDIT_FIELDS = ("name", "description", "endpoint_url", "transport", "consent_tier")
# pydantic's "String should match pattern '...'" in words (the patterns are remote/schemas.py's).
PATTERN_REASONS = {
    "endpoint_url": "must be an http:// or https:// URL such as https://mcp.example.com/mcp",
    "name": "must hold a visible character and no control characters",
    "description": "must not hold control characters",
    "value": "printable ASCII without line breaks or spaces at either end (it is sent as a header)",
}
# Errors without `details` that belong to one field.
FIELD_OF_ERROR: dict[type[ScaiLinkError], str] = {EndpointForbidden: "endpoint_url", Conflict: "name"}


@dataclass
class FieldErrors:
    """Messages by form field, and those that belong to no field (shown above the form)."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    general: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fields or self.general)

    def add(self, name: str | None, message: str) -> None:
        if name:
            self.fields.setdefault(name, []).append(message)
        else:
            self.general.append(message)


def field_errors(err: ScaiLinkError, known: tuple[str, ...] = SERVER_FIELDS) -> FieldErrors:
    """Place each detail of `err` next to its field (`credentials.x` -> the credentials fieldset)."""
    errors = FieldErrors()
    details = err.details if isinstance(err.details, list) else []
    for item in details:
        if not isinstance(item, dict):
            continue
        name = str(item.get("field", ""))
        reason = str(item.get("reason", err.message))
        root = name.split(".")[0]
        if reason.startswith("String should match pattern"):
            reason = PATTERN_REASONS.get(root, "holds characters that are not allowed")
        if root in known:
            errors.add(root, reason)
        elif root == "credentials":
            errors.add("credentials", f"{name.removeprefix('credentials.')}: {reason}".lstrip(": "))
        else:
            errors.add(None, reason)
    if not errors:
        errors.add(FIELD_OF_ERROR.get(type(err)), err.message)
    return errors


def validate(model: type[M], raw: dict[str, Any]) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc) from None


@dataclass
class FormValues:
    """What the user typed, to re-render a form (never a secret value)."""

    values: dict[str, Any]
    credential_names: list[str]


def _credentials(form: Form, auth_type: str) -> tuple[dict[str, str], list[str]]:
    names = form.getlist("credential_name")
    values = form.getlist("credential_value")
    credentials: dict[str, str] = {}
    shown: list[str] = []
    for index, value in enumerate(values):
        name = (names[index] if index < len(names) else "").strip().lower()
        if not name and auth_type == "bearer" and value:
            name = "authorization"  # bearer has exactly one field; the form may leave its name blank
        shown.append(name)
        if name or value:
            if name in credentials:
                raise ValidationFailed(
                    "duplicate credential field",
                    details=[{"field": f"credentials.{name}", "reason": "given twice"}],
                )
            credentials[name] = value
    return credentials, shown


def register_body(form: Form) -> tuple[RegisterServer | None, FormValues, ScaiLinkError | None]:
    """The register form as a `RegisterServer` (or the validation error) and what to re-render."""
    values: dict[str, Any] = {name: form.get(name).strip() for name in SERVER_FIELDS}
    values["description"] = form.get("description")
    values["is_tenant_shared"] = form.get("is_tenant_shared") == "on"
    for name, default in (("transport", "streamable_http"), ("auth_type", "none"), ("consent_tier", "auto")):
        values[name] = values[name] or default
    try:
        credentials, shown = _credentials(form, values["auth_type"])
    except ValidationFailed as err:
        return None, FormValues(values, form.getlist("credential_name")), err
    shown_values = FormValues(values, shown)
    try:
        return validate(RegisterServer, {**values, "credentials": credentials}), shown_values, None
    except ValidationFailed as err:
        return None, shown_values, err


def update_body(
    form: Form, current: dict[str, Any]
) -> tuple[UpdateServer | None, FormValues, ScaiLinkError | None]:
    """The edit form as an `UpdateServer` holding only the fields that changed."""
    values: dict[str, Any] = {name: form.get(name) for name in EDIT_FIELDS}
    for name in ("name", "endpoint_url", "transport", "consent_tier"):
        values[name] = values[name].strip()
    changed = {k: v for k, v in values.items() if v != current.get(k)}
    shown = FormValues(values, [])
    try:
        return validate(UpdateServer, changed), shown, None
    except ValidationFailed as err:
        return None, shown, err


def credential_body(form: Form) -> tuple[str, CredentialValue | None, ScaiLinkError | None]:
    """The rotate form: (field name, the new value as a body, or the validation error)."""
    name = form.get("field").strip().lower()
    if not name:
        err = ValidationFailed("field required", details=[{"field": "field", "reason": "name the field"}])
        return name, None, err
    try:
        return name, validate(CredentialValue, {"value": form.get("value")}), None
    except ValidationFailed as err:
        return name, None, err
