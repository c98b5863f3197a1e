"""Qt helpers of the module's widget: progress dialog, confirmation, keyboard shortcuts.

Only ``SlicerSAM.py``'s widget imports this file: it needs Slicer's application (``qt``,
``slicer.app``), which the Logic never does.
"""

import contextlib

import qt
import slicer

# kept off Slicer's single-key slice-view shortcuts (b, f, r, v, ...)
SHORTCUTS = {
    "Shift+P": "placePositive",
    "Shift+N": "placeNegative",
    "Shift+B": "placeBox",
    "Shift+C": "nextCandidate",
    "Shift+A": "accept",
    "Shift+U": "undo",
}


@contextlib.contextmanager
def progressDialog(label, maximum, cancel=None):
    """A progress dialog shown while the block runs; yields progress(done, total, message) (call
    it on the GUI thread). ``cancel`` (a dict) gets "cancel": True once the user clicks Cancel."""
    dialog = slicer.util.createProgressDialog(
        parent=slicer.util.mainWindow(), windowTitle="SlicerSAM", labelText=label
    )
    dialog.maximum = maximum

    def progress(done, total, message=""):
        if total:
            dialog.maximum = max(int(total), 1)
            dialog.value = min(int(done), dialog.maximum)
        if message:
            dialog.labelText = message
        slicer.app.processEvents()  # paint the dialog and see Cancel
        if cancel is not None:
            cancel["cancel"] = bool(dialog.wasCanceled)

    try:
        yield progress
    finally:
        dialog.close()


def confirm(message, details=""):
    """Ask OK/Cancel in a dialog (the Logic's ``confirmCallback``)."""
    return slicer.util.confirmOkCancelDisplay(
        message, windowTitle="SlicerSAM", detailedText=details or None
    )


def installShortcuts(actions):
    """Main-window shortcuts for :data:`SHORTCUTS`; ``actions`` maps each action name to a
    callable. Returns the QShortcut objects (remove them with :func:`removeShortcuts`)."""
    shortcuts = []
    for keys, action in SHORTCUTS.items():
        shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
        shortcut.connect("activated()", actions[action])
        shortcuts.append(shortcut)
    return shortcuts


def removeShortcuts(shortcuts):
    for shortcut in shortcuts:
        shortcut.setParent(None)
    return []


def fillCombo(combo, items):
    """Fill ``combo`` with (label, data) ``items`` without emitting signals, keeping the current
    item where its data is still offered (else the first)."""
    current = combo.currentData if combo.count else None
    combo.blockSignals(True)
    combo.clear()
    for label, data in items:
        combo.addItem(label, data)
    index = combo.findData(current) if current is not None else 0
    combo.setCurrentIndex(max(index, 0))
    combo.blockSignals(False)


def timer(intervalMs, slot, singleShot=False):
    """A QTimer that calls ``slot`` every ``intervalMs`` ms (once per start if ``singleShot``)."""
    result = qt.QTimer()
    result.setSingleShot(singleShot)
    result.setInterval(intervalMs)
    result.connect("timeout()", slot)
    return result
