"""Facts about a pool's volumes that only qubes.xml holds.

The qubes-reflink tool reads the pool directory; what qubesd keeps in
qubes.xml (a volume's revisions_to_keep, for instance) it reads here,
never changing the file (`migrate` is the one that edits it).
"""

import os
import xml.etree.ElementTree as ET

#: What the host assumes when neither the volume nor its pool says.
DEFAULT_REVISIONS_TO_KEEP = 1


def revisions_to_keep(xml_path, pool_dir, vid):
    """The revisions_to_keep of volume `vid` of the pool in `pool_dir`, as
    qubes.xml gives it; None when qubes.xml (or the volume in it) is not
    there to say."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    real = os.path.realpath(pool_dir)
    pools = {
        pool.get("name"): pool
        for pool in root.iter("pool")
        if pool.get("dir_path")
        and os.path.realpath(pool.get("dir_path")) == real
    }
    for volume in root.iter("volume"):
        pool = pools.get(volume.get("pool"))
        if pool is not None and volume.get("vid") == vid:
            value = volume.get("revisions_to_keep")
            value = value or pool.get("revisions_to_keep")
            return int(value) if value else DEFAULT_REVISIONS_TO_KEEP
    return None
