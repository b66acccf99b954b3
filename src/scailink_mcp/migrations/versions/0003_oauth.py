"""upstream OAuth: client identities, per-user tokens, used one-time values

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 20:10:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
from sqlalchemy.dialects import mysql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mariadb').with_variant(mysql.DATETIME(fsp=6), 'mysql')


def upgrade() -> None:
    op.create_table('oauth_client',
    sa.Column('server_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('grant', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('client_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('issuer', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=True),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('updated_at', TS, nullable=False),
    sa.ForeignKeyConstraint(['server_id'], ['remote_server.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('server_id')
    )
    op.create_table('oauth_token',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('server_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('expires_at', TS, nullable=True),
    sa.Column('dek_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('kek_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=False),
    sa.Column('nonce', sa.LargeBinary(), nullable=False),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('updated_at', TS, nullable=False),
    sa.ForeignKeyConstraint(['server_id'], ['remote_server.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('server_id', 'user_id', name='uq_oauth_token_user')
    )
    with op.batch_alter_table('oauth_token', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_oauth_token_kek_id'), ['kek_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_oauth_token_server_id'), ['server_id'], unique=False)
    op.create_table('oauth_nonce',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('expires_at', TS, nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('oauth_nonce', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_oauth_nonce_expires_at'), ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('oauth_nonce', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_oauth_nonce_expires_at'))
    op.drop_table('oauth_nonce')
    with op.batch_alter_table('oauth_token', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_oauth_token_server_id'))
        batch_op.drop_index(batch_op.f('ix_oauth_token_kek_id'))
    op.drop_table('oauth_token')
    op.drop_table('oauth_client')
