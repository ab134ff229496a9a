/**
 * cloudgpu for JupyterLab: a hardware picker on each notebook's toolbar, a cost and GPU
 * status bar item, and a sessions panel in the left sidebar, all fed by one poll of the
 * server extension (`<base_url>/cloudgpu/api/`).
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import { INotebookModel, INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { CloudGPUModel } from './model';
import { SessionsPanel } from './panel';
import { HardwarePicker } from './picker';
import { CostStatus } from './statusbar';

const PLUGIN_ID = 'cloudgpu:plugin';

/** The settings (see `labextension/schema/plugin.json`). */
interface ISettings {
  pollInterval: number;
  showPicker: boolean;
  showStatusBar: boolean;
  showPanel: boolean;
  budgetWarning: number;
}

const DEFAULTS: ISettings = {
  pollInterval: 2,
  showPicker: true,
  showStatusBar: true,
  showPanel: true,
  budgetWarning: 0.8
};

/** Adds a picker to every notebook's toolbar. */
class PickerExtension implements DocumentRegistry.IWidgetExtension<NotebookPanel, INotebookModel> {
  constructor(private readonly _model: CloudGPUModel) {}

  createNew(panel: NotebookPanel): HardwarePicker {
    const picker = new HardwarePicker(panel, this._model);
    picker.setHidden(!this.settings.showPicker);
    if (!panel.toolbar.insertAfter('cellType', 'cloudgpu-hardware', picker)) {
      panel.toolbar.addItem('cloudgpu-hardware', picker);
    }
    this.pickers.add(picker);
    picker.disposed.connect(() => this.pickers.delete(picker));
    return picker;
  }

  settings: ISettings = DEFAULTS;
  readonly pickers = new Set<HardwarePicker>();
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Pick remote GPU hardware, watch cost and GPU load, manage cloudgpu sessions.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    settingRegistry: ISettingRegistry | null
  ) => {
    let settings: ISettings = { ...DEFAULTS };
    const model = new CloudGPUModel(settings.pollInterval);

    const pickers = new PickerExtension(model);
    app.docRegistry.addWidgetExtension('Notebook', pickers);

    const panel = new SessionsPanel(model);
    const showPanel = (show: boolean) => {
      if (show && !panel.isAttached) {
        app.shell.add(panel, 'left', { rank: 600 });
      } else if (!show && panel.isAttached) {
        panel.parent = null;
      }
    };

    model.ended.connect((_, notice) => {
      Notification.warning(notice, { autoClose: false });
    });

    const status = new CostStatus(model);
    status.notebook = tracker.currentWidget;
    tracker.currentChanged.connect((_, current) => (status.notebook = current));
    statusBar?.registerStatusItem('cloudgpu:status', {
      item: status,
      align: 'left',
      rank: 100,
      isActive: () => settings.showStatusBar
    });

    const apply = (next: ISettings) => {
      settings = next;
      model.setInterval(Math.max(next.pollInterval, 0.5));
      status.warnAt = next.budgetWarning;
      status.setHidden(!next.showStatusBar);
      pickers.settings = next;
      for (const picker of pickers.pickers) {
        picker.setHidden(!next.showPicker);
      }
      showPanel(next.showPanel);
    };
    apply(settings);

    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(loaded => {
          const read = () => apply({ ...DEFAULTS, ...(loaded.composite as Partial<ISettings>) });
          read();
          loaded.changed.connect(read);
        })
        .catch(reason => console.error('cloudgpu: could not load its settings', reason));
    }
  }
};

export default plugin;
