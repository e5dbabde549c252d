"""tidegate's MySQL sidecar proxy."""
