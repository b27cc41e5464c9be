"""The live catalog: items added, updated and retired after the store was built, kept in the store.

* ``sidrec.catalog.encoder``: item text -> embedding -> codes -> a free SID, with the store's own stages
  (``ItemEncoder``, ``NewItem``, ``Assigned``, ``assign_sids``);
* ``sidrec.catalog.log``: the change log in the artifact store (``catalog/changes/<version>.json``,
  create-exclusive versions, a HEAD hint);
* ``sidrec.catalog.state``: applying changes, in order, to a ``sidrec.recommender.LiveCatalog`` (and what
  happens to changes made before the store was republished);
* ``sidrec.catalog.writer``: add / update / retire as optimistic appends (``CatalogWriter``);
* ``sidrec.catalog.session``: a catalog with the log applied and its writer (``open_catalog``,
  ``load_recommender``);
* ``sidrec.catalog.files`` / ``sidrec.catalog.batch``: ``sidrec items add|update|retire FILE``.

Layering: above store, sids, llm, decode and recommender; below serve and cli. Importing this package
imports nothing heavy.
"""
