"""metering: rate limits, budgets, holds, ledger, usage cap

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Self-contained, as 0001: see there.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "keycap_ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("budget_id", sa.String(length=32), nullable=True),
        sa.Column("hold_id", sa.String(length=32), nullable=True),
        sa.Column("meter", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("delta_used", sa.BigInteger(), nullable=False),
        sa.Column("delta_held", sa.BigInteger(), nullable=False),
        sa.Column("period_start", TIMESTAMP, nullable=True),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("metadata", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "kind IN ('charge', 'hold', 'settle', 'release', 'expiry', 'shortfall', 'adjustment', 'topup')",
            name=op.f("ck_keycap_ledger_kind_known"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_ledger_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_ledger")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(
        op.f("ix_keycap_ledger_budget_id_period_start"),
        "keycap_ledger",
        ["budget_id", "period_start"],
        unique=False,
    )
    op.create_index(
        op.f("ix_keycap_ledger_key_id_created_at"),
        "keycap_ledger",
        ["key_id", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_keycap_ledger_org_id_created_at"),
        "keycap_ledger",
        ["org_id", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_keycap_ledger_project_id_created_at"),
        "keycap_ledger",
        ["project_id", "created_at"],
        unique=False,
    )
    op.create_table(
        "keycap_operations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_operations_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_operations")),
        sa.UniqueConstraint(
            "scope",
            "kind",
            "idempotency_key",
            name=op.f("uq_keycap_operations_scope_kind_idempotency_key"),
        ),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_table(
        "keycap_budgets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("subject_id", sa.String(length=32), nullable=False),
        sa.Column("meter", sa.String(length=32), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("anchor_day", sa.SmallInteger(), nullable=True),
        sa.Column("limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("credit_micros", sa.BigInteger(), nullable=False),
        sa.Column("used_micros", sa.BigInteger(), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), nullable=False),
        sa.Column("period_start", TIMESTAMP, nullable=False),
        sa.Column("thresholds", sa.String(length=64), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "anchor_day IS NULL OR (period = 'month' AND anchor_day BETWEEN 1 AND 31)",
            name=op.f("ck_keycap_budgets_anchor_day"),
        ),
        sa.CheckConstraint(
            "period IN ('lifetime', 'day', 'week', 'month')",
            name=op.f("ck_keycap_budgets_period_known"),
        ),
        sa.CheckConstraint(
            "limit_micros >= 0 AND credit_micros >= 0 AND used_micros >= 0 AND held_micros >= 0",
            name=op.f("ck_keycap_budgets_amounts_nonnegative"),
        ),
        sa.CheckConstraint(
            "subject_id = COALESCE(key_id, project_id, org_id)",
            name=op.f("ck_keycap_budgets_subject"),
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["keycap_keys.id"],
            name=op.f("fk_keycap_budgets_key_id_keycap_keys"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "project_id"],
            ["keycap_projects.org_id", "keycap_projects.id"],
            name=op.f("fk_keycap_budgets_org_id_project_id_keycap_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_budgets_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_budgets")),
        sa.UniqueConstraint(
            "subject_id", "meter", "period", name=op.f("uq_keycap_budgets_subject_id_meter_period")
        ),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(op.f("ix_keycap_budgets_key_id"), "keycap_budgets", ["key_id"], unique=False)
    op.create_index(
        op.f("ix_keycap_budgets_org_id_project_id"),
        "keycap_budgets",
        ["org_id", "project_id"],
        unique=False,
    )
    op.create_table(
        "keycap_holds",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("meter", sa.String(length=32), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("budget_ids", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("settled_micros", sa.BigInteger(), nullable=True),
        sa.Column("shortfall_micros", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("closed_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "status IN ('open', 'settled', 'released', 'expired')",
            name=op.f("ck_keycap_holds_status_known"),
        ),
        sa.CheckConstraint("amount_micros >= 0", name=op.f("ck_keycap_holds_amount_nonnegative")),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["keycap_keys.id"],
            name=op.f("fk_keycap_holds_key_id_keycap_keys"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_holds_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_holds")),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(op.f("ix_keycap_holds_key_id"), "keycap_holds", ["key_id"], unique=False)
    op.create_index(
        op.f("ix_keycap_holds_status_expires_at"),
        "keycap_holds",
        ["status", "expires_at"],
        unique=False,
    )
    op.create_table(
        "keycap_rate_limits",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.String(length=32), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("subject_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("meter", sa.String(length=32), nullable=True),
        sa.Column("limit_units", sa.BigInteger(), nullable=False),
        sa.Column("window_ms", sa.BigInteger(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("current_units", sa.BigInteger(), nullable=False),
        sa.Column("previous_units", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "current_units >= 0 AND previous_units >= 0",
            name=op.f("ck_keycap_rate_limits_counts_nonnegative"),
        ),
        sa.CheckConstraint(
            "limit_units >= 0", name=op.f("ck_keycap_rate_limits_limit_nonnegative")
        ),
        sa.CheckConstraint(
            "subject_id = COALESCE(key_id, project_id, org_id)",
            name=op.f("ck_keycap_rate_limits_subject"),
        ),
        sa.CheckConstraint(
            "window_ms BETWEEN 1000 AND 2592000000",
            name=op.f("ck_keycap_rate_limits_window_bounds"),
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["keycap_keys.id"],
            name=op.f("fk_keycap_rate_limits_key_id_keycap_keys"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "project_id"],
            ["keycap_projects.org_id", "keycap_projects.id"],
            name=op.f("fk_keycap_rate_limits_org_id_project_id_keycap_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["keycap_organizations.id"],
            name=op.f("fk_keycap_rate_limits_org_id_keycap_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keycap_rate_limits")),
        sa.UniqueConstraint(
            "subject_id", "name", name=op.f("uq_keycap_rate_limits_subject_id_name")
        ),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    op.create_index(
        op.f("ix_keycap_rate_limits_key_id"), "keycap_rate_limits", ["key_id"], unique=False
    )
    op.create_index(
        op.f("ix_keycap_rate_limits_org_id_project_id"),
        "keycap_rate_limits",
        ["org_id", "project_id"],
        unique=False,
    )
    op.add_column("keycap_keys", sa.Column("max_uses", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Tables only (their indexes go with them); see 0001 on MySQL.
    op.drop_column("keycap_keys", "max_uses")
    op.drop_table("keycap_rate_limits")
    op.drop_table("keycap_holds")
    op.drop_table("keycap_budgets")
    op.drop_table("keycap_operations")
    op.drop_table("keycap_ledger")
