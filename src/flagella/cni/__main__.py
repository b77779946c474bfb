"""``python -m flagella.cni``: the plugin, as the ``flagella-cni`` executable runs it."""

from flagella.cni import main

main()
