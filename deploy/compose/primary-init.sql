-- Runs once, when the primary's data directory is created.  Written to the
-- binlog, so the replica replays it and ends up with the same users and schema.

-- Replication.
CREATE USER IF NOT EXISTS 'repl'@'%' IDENTIFIED BY 'repl-pass';
GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';

-- tidegate's service account (the DSN in TIDEGATE_BACKEND): it reads
-- mysql.user to check application logins, and runs online migrations
-- (binlog, ghost tables, triggers, the state schema _tidegate).
CREATE USER IF NOT EXISTS 'tidegate'@'%' IDENTIFIED BY 'tidegate-pass';
GRANT SELECT ON mysql.user TO 'tidegate'@'%';
GRANT REPLICATION SLAVE, BINLOG MONITOR, PROCESS ON *.* TO 'tidegate'@'%';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, LOCK TABLES, TRIGGER ON `shop`.* TO 'tidegate'@'%';
GRANT ALL PRIVILEGES ON `_tidegate`.* TO 'tidegate'@'%';

-- The application's own account.  tidegate logs in to the database as this
-- user too, so its grants keep applying; mysql_native_password lets the proxy
-- do that without knowing the clear password.
CREATE USER IF NOT EXISTS 'shop'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('shop-pass');
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE ON `shop`.* TO 'shop'@'%';

CREATE DATABASE IF NOT EXISTS `shop` CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS `shop`.`orders` (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  customer_id INT UNSIGNED NOT NULL,
  status ENUM('new', 'paid', 'shipped', 'cancelled') NOT NULL DEFAULT 'new',
  amount_cents INT UNSIGNED NOT NULL,
  created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
  KEY customer_created (customer_id, created_at)
) ENGINE=InnoDB;
