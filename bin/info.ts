// placeholder, replaced below
export async function infoCommand(_argv: string[]): Promise<number> {
  return 1
}
