"""tidegate's online schema-change migrator (never imports ``proxy``)."""
