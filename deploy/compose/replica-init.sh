#!/bin/bash
# Runs once, when the replica's data directory is created: replicate from the
# primary by GTID, from the start of its binlog, so the users, the schema and
# every later write arrive here.  The replica's own setup (root, health check
# users) is not binlogged, so gtid_strict_mode stays satisfied.
set -euo pipefail

mariadb --protocol=socket -uroot -p"${MARIADB_ROOT_PASSWORD}" <<SQL
SET GLOBAL gtid_slave_pos = '';
CHANGE MASTER TO
  MASTER_HOST = '${PRIMARY_HOST}',
  MASTER_PORT = 3306,
  MASTER_USER = '${REPLICATION_USER}',
  MASTER_PASSWORD = '${REPLICATION_PASSWORD}',
  MASTER_USE_GTID = slave_pos,
  MASTER_CONNECT_RETRY = 5;
START SLAVE;
SQL
echo "replica: replicating from ${PRIMARY_HOST} by GTID"
