"""initial schema

Revision ID: 0001
Revises: 
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('environments',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('image', sa.String(length=220), nullable=False),
    sa.Column('lock', sa.Text(), nullable=False),
    sa.Column('python_version', sa.String(length=40), nullable=False),
    sa.Column('platform', sa.String(length=100), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('last_used_at', sa.Float(), nullable=False),
    sa.Column('failed_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('feed_secrets',
    sa.Column('identity', sa.String(length=200), nullable=False),
    sa.Column('host', sa.String(length=400), nullable=False),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('identity', 'host')
    )
    op.create_table('images',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('parent', sa.String(length=220), nullable=True),
    sa.Column('builtin', sa.Boolean(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('requirements', sa.Text(), nullable=False),
    sa.Column('layer_lock', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('python', sa.String(length=400), nullable=True),
    sa.Column('python_version', sa.String(length=40), nullable=True),
    sa.Column('platform', sa.String(length=100), nullable=True),
    sa.Column('path', sa.String(length=1000), nullable=True),
    sa.Column('size_bytes', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('built_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('name', 'version')
    )
    op.create_table('resolutions',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('image', sa.String(length=220), nullable=False),
    sa.Column('lock', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('environment_refs',
    sa.Column('env_id', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['env_id'], ['environments.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('env_id', 'holder')
    )


def downgrade() -> None:
    op.drop_table('environment_refs')
    op.drop_table('resolutions')
    op.drop_table('images')
    op.drop_table('feed_secrets')
    op.drop_table('environments')
