"""sessions and computes

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('computes',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('vm_size', sa.String(length=100), nullable=False),
    sa.Column('vcpu', sa.Float(), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('idle_shutdown_s', sa.Float(), nullable=True),
    sa.Column('identity', sa.String(length=200), nullable=False),
    sa.Column('handle', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('last_activity_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', name='uq_computes_name')
    )
    op.create_table('flow_bindings',
    sa.Column('flow', sa.String(length=1000), nullable=False),
    sa.Column('session_id', sa.String(length=40), nullable=False),
    sa.PrimaryKeyConstraint('flow')
    )
    op.create_table('session_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('session_id', sa.String(length=40), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('from_state', sa.String(length=20), nullable=True),
    sa.Column('to_state', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('session_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_session_events_session_id'), ['session_id'], unique=False)

    op.create_table('sessions',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('flow', sa.String(length=1000), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('compute_type', sa.String(length=20), nullable=False),
    sa.Column('compute_id', sa.String(length=40), nullable=True),
    sa.Column('vm_size', sa.String(length=100), nullable=True),
    sa.Column('image', sa.String(length=220), nullable=True),
    sa.Column('identity', sa.String(length=200), nullable=False),
    sa.Column('idle_timeout_s', sa.Float(), nullable=False),
    sa.Column('env_id', sa.String(length=64), nullable=True),
    sa.Column('snapshot_id', sa.String(length=64), nullable=True),
    sa.Column('handle', sa.Text(), nullable=True),
    sa.Column('operator', sa.String(length=100), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('last_activity_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('standby',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('image', sa.String(length=220), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('handle', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('standby')
    op.drop_table('sessions')
    with op.batch_alter_table('session_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_session_events_session_id'))

    op.drop_table('session_events')
    op.drop_table('flow_bindings')
    op.drop_table('computes')
