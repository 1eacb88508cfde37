"""zds's CNI plugin (``zds-cni``) and its installer (``zds cni install|uninstall``).

The plugin is light on purpose (standard library only): a CNI runtime starts
it once per command, for every container on a network it is chained into.
"""
