"""Fleet: SSH transport to edge devices (``fleet.ssh``) and the devices inventory
(``fleet.inventory``). Nothing is imported here so that ``import edgeops`` stays light."""
