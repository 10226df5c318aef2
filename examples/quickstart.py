"""keycap in one file: issue a key, validate it, watch it be refused.

    python examples/quickstart.py            # a SQLite file, keycap-quickstart.db, here
    KEYCAP_DATABASE_URL=postgresql://... python examples/quickstart.py

The signing secret comes from KEYCAP_SIGNING_SECRET. Without it a fixed demo
secret is used, which is fine for this demo and wrong anywhere else.
"""

from __future__ import annotations

import asyncio
import os

from keycap import APIKeyClient, InsufficientScopeError, RevokedKeyError

DEMO_SECRET = "demo-only-secret-never-use-in-production-0123456789"


async def main() -> None:
    url = os.environ.get("KEYCAP_DATABASE_URL", "sqlite:///keycap-quickstart.db")
    secret = os.environ.get("KEYCAP_SIGNING_SECRET", DEMO_SECRET)
    async with APIKeyClient(
        url, signing_secret=secret, key_prefix="sk", environment="live"
    ) as client:
        await client.create_tables()  # development convenience; deploys run `alembic upgrade head`
        org, _ = await client.get_or_create_organization("Acme")
        project, _ = await client.get_or_create_project(org.id, "agents")
        product, _ = await client.get_or_create_product(org.id, "chat-api")
        await client.add_product_to_project(product.id, project.id)

        issued = await client.create_key(
            org.id,
            project_id=project.id,
            product_id=product.id,
            name="research-agent",
            scopes=["chat:write"],
            expires_in="7d",
            metadata={"user_id": "u_1"},
            delegated_by="user_456",
        )
        print("issued key (shown once):", issued.plaintext)
        print("stored as:", issued.key.start + "…", "id", issued.key.id)

        key = await client.validate_key(
            issued.plaintext, required_scopes=["chat:write"], product_id=product.id
        )
        print(f"validated: {key.id} scopes={list(key.scopes)} use_count={key.use_count}")

        try:
            await client.validate_key(issued.plaintext, required_scopes=["chat:admin"])
        except InsufficientScopeError as error:
            print("refused:", error.code, list(error.missing_scopes))

        await client.revoke_key(key.id)
        try:
            await client.validate_key(issued.plaintext)
        except RevokedKeyError as error:
            print("refused:", error.code, "at", error.revoked_at.isoformat())


if __name__ == "__main__":
    asyncio.run(main())
