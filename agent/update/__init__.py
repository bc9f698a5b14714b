"""Updates over the air (docs/UPDATE.md): bundles, the install beside the running version,
the switch, probation and the report after a rollback by the boot guard."""
