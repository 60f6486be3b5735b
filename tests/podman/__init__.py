"""podman driving unionfs as its overlay mount_program."""
