"""Two tenants with knowledge bases of their own, for the per-tenant speech tests: a dental
practice and a car garage, whose callers use words the other's model does not have."""

from __future__ import annotations

from pathlib import Path

DENTAL, GARAGE = "brightsmile", "autofix"

_DOCUMENTS = {
    DENTAL: """# Services

## Implant
A dental implant replaces a missing tooth. An implant consultation is free.

## Veneers
Porcelain veneers cover the front of your teeth.

## Braces
Invisible braces straighten teeth in about a year.
""",
    GARAGE: """# Services

## Brake pads
We replace worn brake pads and brake rotors. A brake inspection is free.

## Oil change
An oil change takes thirty minutes and includes a new oil filter.

## Wheel alignment
A wheel alignment takes one hour. We also rotate and balance tires.
""",
}
# What each tenant's caller says (eSpeak NG speech, recognised word for word by the
# tenant's own model; the other tenant's model has not the words).
SAID = {
    DENTAL: "I'd like to book an implant consultation.",
    GARAGE: "I need a brake inspection.",
}
# A service the garage adds while the node runs, and a caller asking for it.
NEW_SERVICE = "\n## Windshield repair\nWe repair a cracked windshield while you wait.\n"
SAID_NEW = "I'd like to book a windshield repair."


def write_kbs(root: Path) -> Path:
    """``root`` with one knowledge base directory per tenant (as ``CALLMESH_KB_DIR``)."""
    for tenant, text in _DOCUMENTS.items():
        (root / tenant).mkdir(parents=True, exist_ok=True)
        (root / tenant / "services.md").write_text(text, encoding="utf-8")
    return root


def add_service(root: Path) -> None:
    """The garage's knowledge base changes: a new service is added to its document."""
    with (root / GARAGE / "services.md").open("a", encoding="utf-8") as f:
        f.write(NEW_SERVICE)
