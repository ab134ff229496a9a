/**
 * Calls to the server extension, `<base_url>/cloudgpu/api/...`, with the server's
 * credentials (token, xsrf cookie), as every JupyterLab request.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IHardwareList, ISession, IStatus } from './state';

/** The API's root under the server's base URL. */
export const API_PATH = 'cloudgpu/api';

/** Raised with the server's own message (`{"error", "message"}`) when a call fails. */
export class CloudGPUAPIError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

/** One call; the answer's JSON, or a CloudGPUAPIError saying what the server said. */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, API_PATH, path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new CloudGPUAPIError(`Cannot reach the Jupyter server: ${error}`, 0);
  }
  const text = await response.text();
  let body: any = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body?.message ?? `${response.status} ${response.statusText}`;
    throw new CloudGPUAPIError(message, response.status);
  }
  return body as T;
}

/** `GET status`: sessions, readings and totals. */
export function fetchStatus(endedSince?: number): Promise<IStatus> {
  return requestAPI<IStatus>(endedSince === undefined ? 'status' : `status?ended_since=${endedSince}`);
}

/** `GET hardware`: what the pool offers. */
export function fetchHardware(): Promise<IHardwareList> {
  return requestAPI<IHardwareList>('hardware');
}

/** `GET sessions/{id}`: one session, active or ended. */
export async function fetchSession(id: string): Promise<ISession> {
  const body = await requestAPI<{ session: ISession }>(`sessions/${encodeURIComponent(id)}`);
  return body.session;
}

/** `DELETE sessions/{id}`: stop it. */
export async function stopSession(id: string): Promise<ISession> {
  const body = await requestAPI<{ session: ISession }>(`sessions/${encodeURIComponent(id)}`, {
    method: 'DELETE'
  });
  return body.session;
}
