/** Injection tokens and names shared by the plugin's parts. */
export const DISPATCHER_PLUGIN_OPTIONS = Symbol('DISPATCHER_PLUGIN_OPTIONS');
export const DISPATCH_QUEUE_NAME = 'dispatcher-events';
export const WEBHOOK_ROUTE = 'dispatcher/webhooks';
export const DRIVER_ASSIGNED_STATE = 'DriverAssigned';
export const LOGGER_CTX = 'DispatcherPlugin';
